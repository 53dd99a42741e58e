"""Importing diffusers without transformers' notice about torchvision.

Without torchvision (pccfast does not need it), transformers says once per image processor
that it falls back to the PIL version ("`CLIPImageProcessor` requires torchvision (not
installed); falling back to `CLIPImageProcessorPil`"). Stable Diffusion pipelines only name
those processors (pccfast builds them without a safety checker), so the notice says nothing
about pccfast's results; it is held back while diffusers is imported. Every other warning is
shown as usual.
"""
from __future__ import annotations

import contextlib
import logging

__all__ = ["quiet_imports"]

_NOISY = "transformers.utils.import_utils"  # the logger of the torchvision fall-back notice


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


@contextlib.contextmanager
def quiet_imports():
    """Import diffusers/transformers inside this block without the torchvision fall-back notice."""
    logger = logging.getLogger(_NOISY)
    quiet = _NoTorchvisionNotice()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
