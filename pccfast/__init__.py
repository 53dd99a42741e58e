"""pccfast: tensor-native PCC segmentation (Stable Diffusion attention -> pixel masks).

Heavy modules (diffusers, transformers) load lazily, so the labeller can be used alone.
"""
from __future__ import annotations

import importlib

from pccfast.core.config import PCCConfig
from pccfast.data.labelsets import get_label_set
from pccfast.core.labelset import LabelSet

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "label_images": "pccfast.core.labeller",
    "LabelResult": "pccfast.core.labeller",
    "load_pipeline": "pccfast.diffusion.pipeline",
    "build_tiny_pipeline": "pccfast.diffusion.tiny",
    "generate_with_capture": "pccfast.diffusion.generation",
    "read_capture": "pccfast.data.captures",
    "write_capture": "pccfast.data.captures",
}

__all__ = ["PCCConfig", "LabelSet", "get_label_set", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pccfast' has no attribute {name!r}")
