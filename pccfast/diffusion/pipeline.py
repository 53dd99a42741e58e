"""Loading a diffusion pipeline: a diffusers folder, a hub id, or a tiny test model.

Every failure to load a model raises :class:`ModelLoadError`, whose message is one line that
names the model, the reason and what to do instead.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

__all__ = ["load_pipeline", "ModelLoadError"]

_HINT = "pass --model PATH to a local diffusers Stable Diffusion folder, or --model tiny for the offline test model"
# model_index.json `_class_name`s of the UNet families (diffusion.adapters), loaded with that pipeline class
_PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
_DIT_CLASSES = ("StableDiffusion3Pipeline", "FluxPipeline")  # SD3/SD3.5, FLUX.1: loaded with their own pipeline class
_MAX_REASON = 200  # characters of a library's error message kept in the one-line reason


class ModelLoadError(RuntimeError, OSError):
    """The model could not be loaded; the message is one line saying what to do.

    A ``RuntimeError`` (what a run reports as a failed model load) and an ``OSError`` (what
    callers that catch missing files expect).
    """


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id ("owner/name")."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.endswith(("/", os.sep))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _reason(exc: BaseException, local: bool) -> str:
    """One short line for why ``from_pretrained``/``load_config`` failed."""
    if not local and isinstance(exc, OSError) and _offline():
        return "no local folder of that name, and not in the Hugging Face cache while HF_HUB_OFFLINE is set"
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    if len(line) > _MAX_REASON:
        line = line[: _MAX_REASON - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _error(name: str, reason: str) -> ModelLoadError:
    return ModelLoadError(f"model {name!r} could not be loaded ({reason}): {_HINT}")


def _declared_class(source: str, local: bool):
    """``_class_name`` of the model's ``model_index.json`` where that file is on disk (in the
    folder, or in the Hugging Face cache for a hub id); None where it is not (yet)."""
    try:
        if local:
            index = os.path.join(source, "model_index.json")
        else:
            from huggingface_hub import try_to_load_from_cache

            index = try_to_load_from_cache(source, "model_index.json")  # no network
        if not isinstance(index, str) or not os.path.isfile(index):
            return None
        with open(index, encoding="utf-8") as f:
            return json.load(f).get("_class_name")
    except Exception:  # an invalid hub id, an unreadable or broken file: from_pretrained reports it
        return None


def _check_class(name: str, class_name) -> None:
    """A model of another pipeline class loads into ``StableDiffusionPipeline`` without an error:
    refuse it, naming the class and the supported families."""
    if class_name is not None and class_name not in _PIPELINE_CLASSES + _DIT_CLASSES:
        from pccfast.diffusion.adapters import UnsupportedPipelineError, adapter_class

        try:
            adapter_class(class_name)
        except UnsupportedPipelineError as exc:
            raise _error(name, str(exc)) from None
        raise _error(name, f"a {class_name}, not a {' or '.join(_PIPELINE_CLASSES + _DIT_CLASSES)}")


def _hub_class(source: str):
    """``_class_name`` of a hub model's ``model_index.json``, downloaded (that file only); None
    where it cannot be had (offline, unknown id: ``from_pretrained`` then says why)."""
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(source, "model_index.json"), encoding="utf-8") as f:
            return json.load(f).get("_class_name")
    except Exception:
        return None


def load_pipeline(name_or_path: str, device="cpu", dtype: torch.dtype = torch.float32, *, label_set="voc"):
    """A pipeline of a supported family on ``device`` in ``dtype`` (UNet families with SDPA
    attention processors).

    Args:
        name_or_path: "tiny" (the seeded offline test model, ``tiny.build_tiny_pipeline``),
            "tiny-sdxl", "tiny-turbo", "tiny-lcm" (``tiny_variants``), "tiny-sd3", "tiny-flux" or "tiny-flux-schnell" (``tiny_dit``), a local diffusers
            folder, or a hub id (from the local cache, or downloaded); SD 1.x/2.x (and SD-Turbo)
            load as ``StableDiffusionPipeline``, SDXL (and SDXL-Turbo) as
            ``StableDiffusionXLPipeline``; SD3/SD3.5 and FLUX.1
            checkpoints load as their own pipeline class (``StableDiffusion3Pipeline``,
            ``FluxPipeline``), chosen from ``model_index.json``.
        device, dtype: where the pipeline goes.
        label_set: only for the tiny models: whose class words become single tokens.

    Raises:
        ValueError: ``name_or_path`` is not a non-empty string.
        ModelLoadError: one line, ``model 'X' could not be loaded (reason): pass --model ...``,
            for a missing folder, a file, a folder without a loadable diffusers model, a hub id
            that is neither cached nor downloadable, or a pipeline of another class.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"`name_or_path` has to be a non-empty string but is {name_or_path!r}")
    from pccfast.diffusion.tiny_variants import TINY_MODELS

    if name_or_path in TINY_MODELS:  # tiny, tiny-sdxl, tiny-turbo, tiny-lcm
        return TINY_MODELS[name_or_path](device=device, dtype=dtype, label_set=label_set)
    from pccfast.diffusion.tiny_dit import TINY_DIT_MODELS

    if name_or_path in TINY_DIT_MODELS:  # tiny-sd3, tiny-flux, tiny-flux-schnell
        from pccfast.diffusion.tiny_dit import build_tiny_dit_pipeline

        return build_tiny_dit_pipeline(name_or_path, device=device, dtype=dtype, label_set=label_set)

    from pccfast.diffusion.quiet import quiet_imports

    with quiet_imports():
        import diffusers
        from diffusers.models.attention_processor import AttnProcessor2_0

    path = os.path.expanduser(name_or_path)
    local = os.path.exists(path)
    if not local and _looks_like_path(name_or_path):
        raise _error(name_or_path, "no such folder")
    if local and not os.path.isdir(path):
        raise _error(name_or_path, "not a folder")
    source = path if local else name_or_path
    declared = _declared_class(source, local)
    if declared is None and not local:
        declared = _hub_class(source)
    if declared in _DIT_CLASSES:
        return _load_dit(name_or_path, source, local, declared, device, dtype)
    _check_class(name_or_path, declared)
    try:
        with warnings.catch_warnings():  # newer diffusers call it `dtype`; older ones know only `torch_dtype`
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            if declared == "StableDiffusionXLPipeline":  # no safety checker; no watermark package needed
                pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(source, torch_dtype=dtype, add_watermarker=False)
            else:
                pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                    source, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
                )
    except Exception as exc:  # missing or broken files, no network, not cached, not a diffusers folder, ...
        raise _error(name_or_path, _reason(exc, local)) from exc
    if not local:  # a hub model that was not cached before is now
        _check_class(name_or_path, _declared_class(source, local))
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    return pipe.to(device)


def _load_dit(name: str, source: str, local: bool, class_name: str, device, dtype):
    """An SD3/SD3.5 or FLUX.1 checkpoint with its own pipeline class and default processors."""
    from pccfast.diffusion.quiet import quiet_imports

    with quiet_imports():
        import diffusers

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = getattr(diffusers, class_name).from_pretrained(source, torch_dtype=dtype)
    except Exception as exc:  # missing or broken files, no network, not cached, ...
        raise _error(name, _reason(exc, local)) from exc
    return pipe.to(device)
