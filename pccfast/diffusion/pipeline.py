"""Loading the Stable Diffusion pipeline: a diffusers folder, a hub id, or "tiny"."""
from __future__ import annotations

import os
import warnings

import torch

__all__ = ["load_pipeline", "ModelNotFoundError"]

_HINT = "pass --model PATH to a local diffusers Stable Diffusion folder, or --model tiny for the offline test model"


class ModelNotFoundError(OSError):
    """The model could not be loaded; the message is one line saying what to do."""


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id ("owner/name")."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.endswith(("/", os.sep))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_pipeline(name_or_path: str, device="cpu", dtype: torch.dtype = torch.float32, *, label_set="voc"):
    """A ``StableDiffusionPipeline`` on ``device`` in ``dtype``, with SDPA attention processors.

    Args:
        name_or_path: "tiny" (the seeded offline test model, ``tiny.build_tiny_pipeline``), a
            local diffusers folder, or a hub id (from the local cache, or downloaded).
        device, dtype: where the pipeline goes.
        label_set: only for "tiny": whose class words become single tokens.

    Raises:
        ModelNotFoundError: one line, ``model 'X' could not be loaded (reason): pass --model ...``.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"`name_or_path` has to be a non-empty string but is {name_or_path!r}")
    if name_or_path == "tiny":
        from pccfast.diffusion.tiny import build_tiny_pipeline

        return build_tiny_pipeline(device=device, dtype=dtype, label_set=label_set)

    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    path = os.path.expanduser(name_or_path)
    if not os.path.exists(path) and _looks_like_path(name_or_path):
        raise ModelNotFoundError(f"model {name_or_path!r} could not be loaded (no such folder): {_HINT}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ModelNotFoundError(f"model {name_or_path!r} could not be loaded (not a folder): {_HINT}")
    try:
        with warnings.catch_warnings():  # newer diffusers call it `dtype`; older ones know only `torch_dtype`
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                path if os.path.exists(path) else name_or_path, torch_dtype=dtype, safety_checker=None,
                requires_safety_checker=False,
            )
    except Exception as exc:  # missing files, no network, not a diffusers folder, ...
        raise ModelNotFoundError(
            f"model {name_or_path!r} could not be loaded ({type(exc).__name__}: {_first_line(exc)}): {_HINT}"
        ) from exc
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    return pipe.to(device)
