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
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from pccfast.core.config import PCCConfig
from pccfast.core.labelset import as_label_set
from pccfast.diffusion.adapters import adapter_for
from pccfast.diffusion.capture import AttentionCapture, assemble_class_attention
from pccfast.diffusion.schedulers import check_scheduler, make_scheduler, unet_calls

__all__ = ["CaptureOutput", "generate_with_capture", "compiled_unet", "check_batch", "check_run", "negative_texts",
           "seed_generators", "running", "captured_images"]


@dataclass
class CaptureOutput:
    """What one capture run returns (all on the pipeline's device)."""

    images: Tensor  # (B, 3, H, W) uint8
    features: Tensor  # (B, D, h, w) float32, D = 3 * halves * sum of the feature layers' heads
    class_attention: Tensor  # (B, K, h, w) float32, K = label-set classes, 0 = background
    halves: int = 2  # guidance halves in the features: 2 (CFG, D = 3 * sum of 2*heads), 1 (no guidance)
    dd_affinity: Optional[Tensor] = None  # (B, N2, N2) float32 with ``dd``: Dataset Diffusion's affinity
    dd_class_attention: Optional[Tensor] = None  # (B, K, h4, w4) float32 with ``dd``: its class maps


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


def check_batch(prompts: list, class_names: list, seeds: list) -> int:
    """The batch's size B; ``prompts``, ``class_names`` and ``seeds`` have to hold B >= 1 each."""
    b = len(prompts)
    if b == 0:
        raise ValueError("`prompts` has to hold at least one prompt but is empty")
    if len(class_names) != b or len(seeds) != b:
        raise ValueError(
            f"`prompts`, `class_names` and `seeds` have to have the same length but have {b}, {len(class_names)} and {len(seeds)}"
        )
    return b


def check_run(steps: int, compile) -> None:
    """``steps`` >= 1 and ``compile`` a bool or a torch.compile backend name."""
    if steps < 1:
        raise ValueError(f"`steps` has to be at least 1 but is {steps}")
    if compile is not False and compile is not True and not isinstance(compile, str):
        raise TypeError(f"`compile` has to be a bool or a torch.compile backend name but is {type(compile).__name__}")


def negative_texts(negative_prompt, b: int) -> Optional[list]:
    """``negative_prompt`` (None, one text, or B texts) as B texts, or None."""
    if negative_prompt is None:
        return None
    texts = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(texts) != b or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"`negative_prompt` has to be a text or {b} texts (one per prompt) but is {negative_prompt!r}")
    return texts


def seed_generators(seeds: list, generator_device, device) -> list:
    """One generator per image, seeded with its seed, on ``generator_device`` (default ``device``)."""
    seed_device = torch.device(generator_device) if generator_device is not None else device
    return [torch.Generator(device=seed_device).manual_seed(int(s)) for s in seeds]


@contextlib.contextmanager
def running(pipe, attr: str, model, compile, progress: bool):
    """The pipeline call's surroundings: its progress bar shown or not, and ``pipe.<attr>``
    (the UNet or transformer ``model``) replaced by its compiled version with ``compile``;
    both restored afterwards."""
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**saved_bar, "disable": not progress})
    try:
        if compile:
            setattr(pipe, attr, compiled_unet(model, "inductor" if compile is True else compile))
        yield
    finally:
        pipe._progress_bar_config = saved_bar
        if getattr(pipe, attr) is not model:
            setattr(pipe, attr, model)


def captured_images(capture, images: Tensor) -> Tensor:
    """The pipeline's float images (B, 3, H, W) in [0, 1] as uint8, once the capture saw every
    denoiser call it expected."""
    if capture.step != capture.num_steps:
        raise RuntimeError(f"the pipeline made {capture.step} denoising steps but {capture.num_steps} were expected")
    return (images * 255).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)


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
    scheduler: Optional[str] = None,
    negative_prompt=None,
    feature_blocks=None,
) -> CaptureOutput:
    """Generate a batch of images with attention capture (one pipeline call for the batch).

    Args:
        pipe: a diffusers ``StableDiffusionPipeline``.
        prompts: B prompts.
        class_names: per image, its class names (label-set names; order and repeats kept).
        label_set: name, dict or ``LabelSet`` (K classes).
        seeds: B seeds; image i's latents come from ``torch.Generator(device).manual_seed(seeds[i])``,
            so a prompt gives the same image whatever batch it is in.
        steps, guidance, height, width: diffusion settings. With classifier-free guidance
            (guidance > 1 and a model without a guidance embedding) the class maps use the
            unconditional half's queries and the features both halves' heads; without
            (guidance <= 1, or a guidance-distilled model) the only half. Height and width
            are multiples of the adapter's ``size_factor`` (8 for SD 1/2, 16 for SDXL), not
            necessarily equal.
        cfg: PCA settings (reference defaults when None).
        generator_device: device of the seed generators (default: the pipeline's device).
        progress: show the pipeline's per-step progress bar.
        compile: run a ``torch.compile``-d UNet: True for the default backend ("inductor") or a
            backend name ("eager", "aot_eager", ...); False (default) runs eagerly. The images,
            features and class maps are those of the eager run (to the bit with "eager").
        dd: a ``core.dd.DDConfig`` to also capture Dataset Diffusion's affinity and class
            attention in the same pass (:mod:`pccfast.diffusion.dd_capture`; the images do not
            change), returned as ``dd_affinity`` and ``dd_class_attention``; None (default): not.
        scheduler: a ``schedulers.SCHEDULERS`` name, built from the pipeline's scheduler config
            for this call (the pipeline keeps its own); None (default) runs the pipeline's own.
        negative_prompt: a text, or one per prompt, for the unconditional half (with guidance
            only; None: the empty prompt as usual).
        feature_blocks: SD3/FLUX only: the transformer blocks whose image tokens give the
            features and class maps (``joint_capture.parse_feature_blocks``; None: the family's
            default). SD3 and FLUX pipelines run the joint-attention capture
            (``dit_generation.generate_with_capture_dit``), which takes ``compile`` and (SD3
            only) ``negative_prompt``, but no ``dd`` or ``scheduler``.

    Returns:
        ``CaptureOutput``: images (B, 3, H, W) uint8, features (B, D, h, w) float32 and
        class_attention (B, K, h, w) float32, with (h, w) = the adapter's labelling grid (the
        latent size H/8 x W/8 for SD 1/2, half of it for SDXL), and the guidance ``halves``.
    """
    b = check_batch(prompts, class_names, seeds)
    if not guidance >= 0.0:
        raise ValueError(f"`guidance` has to be at least 0 but is {guidance}")
    check_scheduler(scheduler)
    texts = negative_texts(negative_prompt, b)
    adapter = adapter_for(pipe)
    adapter.check_size(height, width)
    if getattr(adapter, "has_own_capture", False):  # SD3, FLUX: the joint-attention capture (dit_adapters)
        adapter.feature_blocks = feature_blocks
        return adapter.generate(prompts, class_names, label_set, seeds, steps=steps, guidance=guidance, height=height,
                                width=width, cfg=cfg, generator_device=generator_device, progress=progress,
                                compile=compile, dd=dd, scheduler=scheduler, negative_prompt=negative_prompt)
    if feature_blocks not in (None, "default"):
        raise ValueError(f"`feature_blocks` chooses blocks of a diffusion transformer (SD3, FLUX) but is "
                         f"{feature_blocks!r} for a {adapter.family} model")
    check_run(steps, compile)
    ls = as_label_set(label_set)
    device = pipe._execution_device
    unet = adapter.denoiser
    adapter = type(adapter)(pipe, denoiser=unet)  # the eager UNet, also while a compiled one runs
    latent_hw, grid_hw = adapter.latent_hw(height, width), adapter.grid_hw(height, width)
    embeds, mask, tok = adapter.encode_class_texts(class_names, ls)
    generators = seed_generators(seeds, generator_device, device)
    sampler = pipe.scheduler if scheduler is None else make_scheduler(scheduler, pipe.scheduler)
    num_calls = unet_calls(sampler, steps, device)  # from the scheduler: some call more than once per step
    halves = adapter.halves(guidance)
    extra = dict(adapter.call_kwargs(height, width))
    if texts is not None:
        extra["negative_prompt"] = texts
    dd_capture = None
    if dd is not None:
        from pccfast.diffusion.dd_capture import dd_capture_for

        dd_capture = dd_capture_for(adapter, class_names, ls, num_calls, grid_hw, dd, halves)
    capture = AttentionCapture(unet, embeds, mask, num_calls, latent_hw, cfg,
                               adapter=adapter, halves=halves, grid_hw=grid_hw,
                               listeners=() if dd_capture is None else (dd_capture,))
    own_scheduler = pipe.scheduler
    try:
        pipe.scheduler = sampler
        with running(pipe, "unet", unet, compile, progress), capture, (
                dd_capture if dd_capture is not None else contextlib.nullcontext()):
            out = pipe(
                prompt=list(prompts),
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="pt",
                callback_on_step_end=capture.on_step_end,
                **extra,
            )
    finally:
        pipe.scheduler = own_scheduler
    images = captured_images(capture, out.images)  # (B, 3, H, W) uint8
    features = capture.features()
    class_attention = assemble_class_attention(capture.token_maps(), tok.classes, ls.num_classes, grid_hw, (height, width))
    if dd_capture is None:
        return CaptureOutput(images=images, features=features, class_attention=class_attention, halves=halves)
    return CaptureOutput(images=images, features=features, class_attention=class_attention, halves=halves,
                         dd_affinity=dd_capture.affinity(), dd_class_attention=dd_capture.class_attention())
