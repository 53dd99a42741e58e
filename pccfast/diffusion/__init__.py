"""Diffusion models with attention capture: loading, model adapters, capture, generation.

Modules (imports go downward: generation -> capture, adapters -> processors, layers, tokens;
all use ``pccfast.core`` only):

* ``pipeline``: ``load_pipeline`` and ``ModelLoadError``;
* ``tiny``: the seeded offline test pipeline; ``tiny_variants``: ``tiny-sdxl``, ``tiny-turbo``
  and ``tiny-lcm`` (``TINY_MODELS``: every tiny UNet model by name);
* ``adapters``: one ``ModelAdapter`` per model family (layers, class-text encoding, sizes,
  guidance halves), chosen from the pipeline's class by ``adapter_for``: SD 1.x/2.x and
  SD-Turbo (``StableDiffusionAdapter``), SDXL and SDXL-Turbo (``StableDiffusionXLAdapter``);
* ``schedulers``: ``--scheduler`` names, built from the checkpoint's scheduler config, and the
  UNet calls a run makes;
* ``settings``: ``GenerationConfig``, the diffusion settings of a run;
* ``layers``: the UNet layer names the UNet adapters capture;
* ``processors``: the attention math and the diffusers-style processors;
* ``tokens``: class texts, their tokens, and their encoding with the pipeline's text encoder;
* ``capture``: ``AttentionCapture`` (buffers, steps) and the class-attention assembly;
* ``generation``: ``generate_with_capture`` and ``CaptureOutput``;
* diffusion transformers (SD3/SD3.5, FLUX.1): ``dit_adapters`` (their adapters, which hand the
  run to ``dit_generation.generate_with_capture_dit``), ``joint_capture`` (the joint-attention
  processors and ``JointAttentionCapture``), ``dit_text`` (their class-text encoding) and
  ``tiny_dit`` (``tiny-sd3``, ``tiny-flux``, ``tiny-flux-schnell``).

The names below load lazily (diffusers and transformers only when a pipeline is built).
"""
from __future__ import annotations

import importlib

# public name -> module that defines it (imported on first access)
_LAZY = {
    "generate_with_capture": "pccfast.diffusion.generation",
    "CaptureOutput": "pccfast.diffusion.generation",
    "AttentionCapture": "pccfast.diffusion.capture",
    "ModelAdapter": "pccfast.diffusion.adapters",
    "adapter_for": "pccfast.diffusion.adapters",
    "assemble_class_attention": "pccfast.diffusion.capture",
    "encode_class_texts": "pccfast.diffusion.tokens",
    "load_pipeline": "pccfast.diffusion.pipeline",
    "ModelLoadError": "pccfast.diffusion.pipeline",
    "build_tiny_pipeline": "pccfast.diffusion.tiny",
    "generate_with_capture_dit": "pccfast.diffusion.dit_generation",
    "build_tiny_dit_pipeline": "pccfast.diffusion.tiny_dit",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
