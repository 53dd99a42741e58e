"""One batch of prompts through the Stable Diffusion pipeline with attention capture.

``generate_with_capture`` encodes the images' class texts, seeds one ``torch.Generator`` per
image, runs the pipeline once for the batch inside an :class:`AttentionCapture`, and returns
the images with the labeller's inputs (``features`` and ``class_attention``) as a
``CaptureOutput``. With ``compile`` the pipeline runs a ``torch.compile``-d UNet (compiled
once per UNet and backend and kept for later batches); the capture adds no per-step
recompilation (see :mod:`pccfast.diffusion.capture`).
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from pccfast.core.config import PCCConfig
from pccfast.core.labelset import as_label_set
from pccfast.diffusion.adapters import adapter_for
from pccfast.diffusion.capture import AttentionCapture, assemble_class_attention

__all__ = ["CaptureOutput", "generate_with_capture", "compiled_unet"]


@dataclass
class CaptureOutput:
    """What one capture run returns (all on the pipeline's device)."""

    images: Tensor  # (B, 3, H, W) uint8
    features: Tensor  # (B, D, h, w) float32, D = 3 * sum over up-block attn1 layers of 2*heads
    class_attention: Tensor  # (B, K, h, w) float32, K = label-set classes, 0 = background
    dd_affinity: Optional[Tensor] = None  # (B, N2, N2) float32 with ``dd``: Dataset Diffusion's affinity
    dd_class_attention: Optional[Tensor] = None  # (B, K, h4, w4) float32 with ``dd``: its class maps


def _count_unet_calls(scheduler, steps: int, device) -> int:
    """UNet calls of a run with ``steps`` inference steps (PNDM makes one more), on a copy."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps, device=device)
    return len(sched.timesteps)


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # unet -> {backend: compiled unet}


def compiled_unet(unet, backend: str = "inductor"):
    """``torch.compile(unet, backend=backend)``, made once per UNet and backend and kept.

    Dynamo guards on the processors: with the capture a UNet compiles three graphs per input
    shape (the first step, the steps that add into the class maps, the recording last step),
    whatever the number of steps, and later batches of the same shapes reuse them.
    """
    if not isinstance(backend, str):
        raise TypeError(f"`compile` has to be a bool or a torch.compile backend name but is {type(backend).__name__}")
    per_backend = _COMPILED.setdefault(unet, {})
    if backend not in per_backend:
        per_backend[backend] = torch.compile(unet, backend=backend)
    return per_backend[backend]


def generate_with_capture(
    pipe,
    prompts: list,
    class_names: list,
    label_set,
    seeds: list,
    steps: int = 80,
    guidance: float = 7.5,
    height: int = 512,
    width: int = 512,
    cfg: Optional[PCCConfig] = None,
    *,
    generator_device=None,
    progress: bool = False,
    compile=False,
    dd=None,
) -> CaptureOutput:
    """Generate a batch of images with attention capture (one pipeline call for the batch).

    Args:
        pipe: a diffusers ``StableDiffusionPipeline``.
        prompts: B prompts.
        class_names: per image, its class names (label-set names; order and repeats kept).
        label_set: name, dict or ``LabelSet`` (K classes).
        seeds: B seeds; image i's latents come from ``torch.Generator(device).manual_seed(seeds[i])``,
            so a prompt gives the same image whatever batch it is in.
        steps, guidance, height, width: diffusion settings (guidance > 1: the captures use
            the unconditional CFG half; height == width, multiples of 8).
        cfg: PCA settings (reference defaults when None).
        generator_device: device of the seed generators (default: the pipeline's device).
        progress: show the pipeline's per-step progress bar.
        compile: run a ``torch.compile``-d UNet: True for the default backend ("inductor") or a
            backend name ("eager", "aot_eager", ...); False (default) runs eagerly. The images,
            features and class maps are those of the eager run (to the bit with "eager").
        dd: a ``core.dd.DDConfig`` to also capture Dataset Diffusion's affinity and class
            attention in the same pass (:mod:`pccfast.diffusion.dd_capture`; the images do not
            change), returned as ``dd_affinity`` and ``dd_class_attention``; None (default): not.

    Returns:
        ``CaptureOutput``: images (B, 3, H, W) uint8, features (B, D, h, w) float32 and
        class_attention (B, K, h, w) float32, with (h, w) = the latent size (H/8, W/8).
    """
    b = len(prompts)
    if b == 0:
        raise ValueError("`prompts` has to hold at least one prompt but is empty")
    if len(class_names) != b or len(seeds) != b:
        raise ValueError(
            f"`prompts`, `class_names` and `seeds` have to have the same length but have {b}, {len(class_names)} and {len(seeds)}"
        )
    if not guidance > 1.0:
        raise ValueError(f"`guidance` has to be greater than 1 (the captures use the unconditional CFG half) but is {guidance}")
    adapter = adapter_for(pipe)
    factor = adapter.size_factor
    if height != width or height % factor or height < factor:
        raise ValueError(
            f"`height` and `width` have to be equal positive multiples of {factor} (square features) but are {height} and {width}"
        )
    if steps < 1:
        raise ValueError(f"`steps` has to be at least 1 but is {steps}")
    if compile is not False and compile is not True and not isinstance(compile, str):
        raise TypeError(f"`compile` has to be a bool or a torch.compile backend name but is {type(compile).__name__}")
    ls = as_label_set(label_set)
    device = pipe._execution_device
    unet = adapter.denoiser
    adapter = type(adapter)(pipe, denoiser=unet)  # the eager UNet, also while a compiled one runs
    latent_hw, grid_hw = adapter.latent_hw(height, width), adapter.grid_hw(height, width)
    embeds, mask, tok = adapter.encode_class_texts(class_names, ls)
    seed_device = torch.device(generator_device) if generator_device is not None else device
    generators = [torch.Generator(device=seed_device).manual_seed(int(s)) for s in seeds]
    num_calls = _count_unet_calls(pipe.scheduler, steps, device)
    dd_capture = None
    if dd is not None:
        from pccfast.diffusion.dd_capture import dd_capture_for

        dd_capture = dd_capture_for(adapter, class_names, ls, num_calls, grid_hw, dd, adapter.halves(guidance))
    capture = AttentionCapture(unet, embeds, mask, num_calls, latent_hw, cfg,
                               adapter=adapter, halves=adapter.halves(guidance), grid_hw=grid_hw,
                               listeners=() if dd_capture is None else (dd_capture,))
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**saved_bar, "disable": not progress})
    try:
        if compile:
            pipe.unet = compiled_unet(unet, "inductor" if compile is True else compile)
        with capture, (dd_capture if dd_capture is not None else contextlib.nullcontext()):
            out = pipe(
                prompt=list(prompts),
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="pt",
                callback_on_step_end=capture.on_step_end,
                **adapter.call_kwargs(height, width),
            )
    finally:
        pipe._progress_bar_config = saved_bar
        if pipe.unet is not unet:
            pipe.unet = unet
    if capture.step != capture.num_steps:
        raise RuntimeError(f"the pipeline made {capture.step} denoising steps but {capture.num_steps} were expected")
    images = (out.images * 255).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)
    features = capture.features()
    class_attention = assemble_class_attention(capture.token_maps(), tok.classes, ls.num_classes, grid_hw, (height, width))
    if dd_capture is None:
        return CaptureOutput(images=images, features=features, class_attention=class_attention)
    return CaptureOutput(images=images, features=features, class_attention=class_attention,
                         dd_affinity=dd_capture.affinity(), dd_class_attention=dd_capture.class_attention())
