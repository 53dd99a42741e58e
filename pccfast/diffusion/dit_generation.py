"""One batch of prompts through an SD3/SD3.5 or FLUX.1 pipeline with the joint-attention capture.

``generate_with_capture_dit`` is the DiT counterpart of
:func:`pccfast.diffusion.generation.generate_with_capture` and returns the same
``CaptureOutput``: the images, the head-wise features of the chosen blocks (``feature_blocks``)
and the class maps, on the image-token grid (image side / 16), ready for the labeller.

Guidance halves: SD3 runs classifier-free guidance when ``guidance > 1`` (transformer batch
[unconditional; conditional]: features from both halves, class maps from the unconditional
one) and none otherwise; FLUX.1 never has a guidance batch (dev embeds the guidance scale,
schnell ignores it), so features and class maps come from the only half.
"""
from __future__ import annotations

from typing import Optional

import torch

from pccfast.core.config import PCCConfig
from pccfast.core.labelset import as_label_set
from pccfast.diffusion.capture import assemble_class_attention
from pccfast.diffusion.dit_text import encode_dit_class_texts
from pccfast.diffusion.generation import CaptureOutput
from pccfast.diffusion.joint_capture import JointAttentionCapture, dit_family, parse_feature_blocks

__all__ = ["generate_with_capture_dit", "dit_halves", "DIT_GRID_FACTOR"]

DIT_GRID_FACTOR = 16  # image side / image-token side: VAE factor 8, then 2x2 patches (SD3) or packing (FLUX)


def dit_halves(pipe, guidance: float) -> int:
    """2 when the transformer batch is [unconditional; conditional] (SD3 with guidance > 1), else 1."""
    return 2 if dit_family(pipe.transformer) == "sd3" and guidance > 1 else 1


def _grid_factor(pipe) -> int:
    patch = int(getattr(pipe.transformer.config, "patch_size", 1) or 1)
    vae = int(getattr(pipe, "vae_scale_factor", 8))
    return vae * (2 if dit_family(pipe.transformer) == "flux" else patch)


def generate_with_capture_dit(
    pipe,
    prompts: list,
    class_names: list,
    label_set,
    seeds: list,
    steps: int = 28,
    guidance: float = 7.0,
    height: int = 1024,
    width: int = 1024,
    cfg: Optional[PCCConfig] = None,
    *,
    feature_blocks=None,
    generator_device=None,
    progress: bool = False,
    max_sequence_length: Optional[int] = None,
) -> CaptureOutput:
    """Generate a batch of images with the joint-attention capture (one pipeline call).

    Args:
        pipe: a diffusers ``StableDiffusion3Pipeline`` or ``FluxPipeline``.
        prompts, class_names, label_set, seeds: as for ``generate_with_capture``.
        steps: denoising steps (flow-matching Euler: one transformer call each).
        guidance: SD3: classifier-free guidance scale (> 1: a guidance batch); FLUX.1-dev: the
            embedded guidance; FLUX.1-schnell: ignored.
        height, width: multiples of 16 (not necessarily equal).
        cfg: PCA settings (reference defaults when None).
        feature_blocks: blocks whose image tokens give features and class maps
            (``joint_capture.parse_feature_blocks``; default: the later half of the joint or
            dual-stream blocks).
        generator_device: device of the seed generators (default: the pipeline's device).
        progress: show the pipeline's per-step progress bar.
        max_sequence_length: T5 tokens of the prompts (the pipeline's default when None).

    Returns:
        ``CaptureOutput``: images (B, 3, H, W) uint8, features (B, D, h, w) float32 with
        D = 3 * halves * heads * blocks, class_attention (B, K, h, w) float32, (h, w) = (H/16, W/16).
    """
    b = len(prompts)
    if b == 0:
        raise ValueError("`prompts` has to hold at least one prompt but is empty")
    if len(class_names) != b or len(seeds) != b:
        raise ValueError(
            f"`prompts`, `class_names` and `seeds` have to have the same length but have {b}, {len(class_names)} and {len(seeds)}"
        )
    factor = _grid_factor(pipe)
    if height % factor or width % factor or height < factor or width < factor:
        raise ValueError(f"`height` and `width` have to be positive multiples of {factor} but are {height} and {width}")
    if steps < 1:
        raise ValueError(f"`steps` has to be at least 1 but is {steps}")
    ls = as_label_set(label_set)
    device = pipe._execution_device
    grid_hw = (height // factor, width // factor)
    blocks = parse_feature_blocks(feature_blocks, pipe.transformer)
    embeds, mask, tok = encode_dit_class_texts(pipe, class_names, ls)
    halves = dit_halves(pipe, guidance)
    seed_device = torch.device(generator_device) if generator_device is not None else device
    generators = [torch.Generator(device=seed_device).manual_seed(int(s)) for s in seeds]
    capture = JointAttentionCapture(pipe.transformer, embeds, mask, steps, grid_hw, halves, blocks, cfg)
    kwargs = {} if max_sequence_length is None else {"max_sequence_length": int(max_sequence_length)}
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**saved_bar, "disable": not progress})
    try:
        with capture:
            out = pipe(prompt=list(prompts), height=height, width=width, num_inference_steps=steps,
                       guidance_scale=guidance, generator=generators, output_type="pt",
                       callback_on_step_end=capture.on_step_end, **kwargs)
    finally:
        pipe._progress_bar_config = saved_bar
    if capture.step != capture.num_steps:
        raise RuntimeError(f"the pipeline made {capture.step} denoising steps but {capture.num_steps} were expected")
    images = (out.images * 255).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)
    features = capture.features()
    class_attention = assemble_class_attention(capture.token_maps(), tok.classes, ls.num_classes, grid_hw, (height, width))
    return CaptureOutput(images=images, features=features, class_attention=class_attention, halves=halves)
