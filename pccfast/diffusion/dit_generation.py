"""One batch of prompts through an SD3/SD3.5 or FLUX.1 pipeline with the joint-attention capture.

``generate_with_capture_dit`` is the DiT counterpart of
:func:`pccfast.diffusion.generation.generate_with_capture` and returns the same
``CaptureOutput``: the images, the head-wise features of the chosen blocks (``feature_blocks``)
and the class maps, on the image-token grid (image side / 16), ready for the labeller.

Guidance halves: SD3 runs classifier-free guidance when ``guidance > 1`` (transformer batch
[unconditional; conditional]: features from both halves, class maps from the unconditional
one) and none otherwise; a negative prompt is the unconditional half's text (as for the UNet
families). FLUX.1 never has a guidance batch (dev embeds the guidance scale, schnell ignores
it), so features and class maps come from the only half, and it takes no negative prompt.
"""
from __future__ import annotations

from typing import Optional

from pccfast.core.config import PCCConfig
from pccfast.core.labelset import as_label_set
from pccfast.diffusion.capture import assemble_class_attention
from pccfast.diffusion.dit_text import encode_dit_class_texts
from pccfast.diffusion.generation import (CaptureOutput, captured_images, check_batch, check_run, negative_texts,
                                         running, seed_generators)
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
    negative_prompt=None,
    compile=False,
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
        negative_prompt: SD3 only: a text, or one per prompt, encoded by the pipeline for the
            unconditional half (with guidance > 1 only, as the pipeline does; None: the empty
            prompt). FLUX.1 has no unconditional half and refuses it.
        compile: run a ``torch.compile``-d transformer: True for "inductor" or a backend name
            ("eager", ...); made once per transformer and backend and kept
            (``generation.compiled_unet``). The capture compiles a graph for the first call,
            one for the calls that add into the class maps and one for the recording last
            call, whatever the number of steps; the per-head outputs are then reduced after
            the last call (all chosen blocks' outputs alive at once, instead of one block's).

    Returns:
        ``CaptureOutput``: images (B, 3, H, W) uint8, features (B, D, h, w) float32 with
        D = 3 * halves * heads * blocks, class_attention (B, K, h, w) float32, (h, w) = (H/16, W/16).
    """
    b = check_batch(prompts, class_names, seeds)
    factor = _grid_factor(pipe)
    if height % factor or width % factor or height < factor or width < factor:
        raise ValueError(f"`height` and `width` have to be positive multiples of {factor} but are {height} and {width}")
    check_run(steps, compile)
    transformer = pipe.transformer
    family = dit_family(transformer)
    kwargs = {} if max_sequence_length is None else {"max_sequence_length": int(max_sequence_length)}
    if negative_prompt is not None:
        if family == "flux":
            raise ValueError(f"`negative_prompt` is the text of the unconditional half, which a flux model does not "
                             f"have (no classifier-free guidance batch) but is {negative_prompt!r}")
        kwargs["negative_prompt"] = negative_texts(negative_prompt, b)
    ls = as_label_set(label_set)
    device = pipe._execution_device
    grid_hw = (height // factor, width // factor)
    blocks = parse_feature_blocks(feature_blocks, transformer)
    embeds, mask, tok = encode_dit_class_texts(pipe, class_names, ls)
    halves = dit_halves(pipe, guidance)
    generators = seed_generators(seeds, generator_device, device)
    capture = JointAttentionCapture(transformer, embeds, mask, steps, grid_hw, halves, blocks, cfg,
                                    reduce_after_step=bool(compile))
    with running(pipe, "transformer", transformer, compile, progress), capture:
        out = pipe(prompt=list(prompts), height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, generator=generators, output_type="pt",
                   callback_on_step_end=capture.on_step_end, **kwargs)
    images = captured_images(capture, out.images)  # (B, 3, H, W) uint8
    features = capture.features()
    class_attention = assemble_class_attention(capture.token_maps(), tok.classes, ls.num_classes, grid_hw, (height, width))
    return CaptureOutput(images=images, features=features, class_attention=class_attention, halves=halves)
