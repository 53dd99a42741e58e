"""Tiny, seeded, offline test pipelines of the other UNet families: SDXL and a turbo model.

* ``tiny-sdxl``: a ``StableDiffusionXLPipeline`` with SDXL-base's topology in miniature: a
  UNet whose first level has no attention (DownBlock2D, then two CrossAttnDownBlock2D; up:
  two CrossAttnUpBlock2D, then UpBlock2D), transformer depth 1, 2 and 3 at its levels (SDXL:
  1, 2, 10), ``text_time`` added conditioning (pooled text embedding + 6 size ids), two CLIP
  text encoders (the second with a projection) whose penultimate hidden states are
  concatenated (32 + 32 = 64 channels, SDXL: 768 + 1280), both with the package's own
  tokenizer vocabulary, the tiny VAE (factor 8) and SDXL-base's Euler scheduler. Its
  labelling grid is the finest attention level, half the latent side (as SDXL's 64x64 for a
  1024x1024 image, whose latents are 128x128), so image sides are multiples of 16.
* ``tiny-turbo``: the tiny SD 2.1-topology model with SD-Turbo's scheduler (Euler, trailing
  timesteps), to be run as SD-Turbo is, guidance-free (``--guidance 0``) in 1 to 4 steps.
* ``tiny-lcm``: the tiny SD model with a guidance embedding (``time_cond_proj_dim``, as
  latent-consistency-distilled UNets have) and the LCM scheduler: guidance-distilled, so its
  UNet batch is B whatever the guidance scale.

Random weights: images are noise; these exist to test the machinery.
"""
from __future__ import annotations

import torch

from pccfast.diffusion.tiny import (
    SD21_BASE_SCHEDULER_CONFIG, TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG, build_tiny_pipeline,
    build_tiny_tokenizer,
)

__all__ = [
    "TINY_MODELS",
    "TINY_SDXL_UNET_CONFIG",
    "SDXL_BASE_SCHEDULER_CONFIG",
    "SD_TURBO_SCHEDULER_CONFIG",
    "build_tiny_sdxl_pipeline",
    "build_tiny_turbo_pipeline",
    "build_tiny_lcm_pipeline",
    "build_tiny_model",
]

_TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)
_TEXT_2_PROJECTION = 32  # text_encoder_2's projection_dim (SDXL: 1280), the pooled embedding

TINY_SDXL_UNET_CONFIG = dict(
    sample_size=128,  # latent side of a 1024x1024 image
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(40, 80, 160),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),  # heads per level (SDXL's naming and numbers), head dim 8
    transformer_layers_per_block=(1, 2, 3),  # SDXL: (1, 2, 10)
    cross_attention_dim=64,  # the two text encoders' hidden sizes, concatenated
    use_linear_projection=True,
    norm_num_groups=8,
    upcast_attention=False,
    addition_embed_type="text_time",
    addition_time_embed_dim=_TIME_DIM,
    projection_class_embeddings_input_dim=_TEXT_2_PROJECTION + 6 * _TIME_DIM,  # pooled text + 6 size ids
)

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (the keys EulerDiscreteScheduler takes)
SDXL_BASE_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    steps_offset=1,
    timestep_spacing="leading",
)

# stabilityai/sd-turbo scheduler/scheduler_config.json: Euler with trailing timesteps
SD_TURBO_SCHEDULER_CONFIG = dict(SDXL_BASE_SCHEDULER_CONFIG, timestep_spacing="trailing", steps_offset=1)

_TINY_LCM_TIME_COND = 32  # time_cond_proj_dim of the guidance embedding (LCM-distilled UNets: 256)


def _cast(pipe, dtype, models) -> None:
    if dtype != torch.float32:
        for model in models:
            torch.nn.Module.to(model, dtype)


def build_tiny_sdxl_pipeline(seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32, label_set="voc"):
    """A seeded random-weight ``StableDiffusionXLPipeline`` with SDXL-base's topology (module docstring).

    Args:
        seed: same seed (and label set) -> identical weights; the global RNG is forked, seeded
            for the construction and restored.
        device, dtype: where the pipeline is moved.
        label_set: whose words become single tokens (VOC and COCO always do).
    """
    from pccfast.diffusion.quiet import quiet_imports

    with quiet_imports():
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer(label_set)
    tokenizer_2 = build_tiny_tokenizer(label_set)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    text_1 = CLIPTextConfig(**ids, **TINY_TEXT_CONFIG)
    text_2 = CLIPTextConfig(**ids, **dict(TINY_TEXT_CONFIG, projection_dim=_TEXT_2_PROJECTION))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
        vae = AutoencoderKL(**dict(TINY_VAE_CONFIG, scaling_factor=0.13025))  # SDXL's VAE scaling
        text_encoder = CLIPTextModel(text_1)
        text_encoder_2 = CLIPTextModelWithProjection(text_2)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=EulerDiscreteScheduler(**SDXL_BASE_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe = pipe.to(device=device)
    _cast(pipe, dtype, (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2))
    return pipe


def build_tiny_turbo_pipeline(seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32, label_set="voc"):
    """The tiny SD model (same weights as ``tiny`` for the same seed) with SD-Turbo's scheduler."""
    from pccfast.diffusion.quiet import quiet_imports

    with quiet_imports():
        from diffusers import EulerDiscreteScheduler

    pipe = build_tiny_pipeline(seed=seed, device=device, dtype=dtype, label_set=label_set)
    pipe.scheduler = EulerDiscreteScheduler(**SD_TURBO_SCHEDULER_CONFIG)
    return pipe


def build_tiny_lcm_pipeline(seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32, label_set="voc"):
    """The tiny SD topology with a guidance embedding (``time_cond_proj_dim``) and the LCM scheduler."""
    from pccfast.diffusion.quiet import quiet_imports
    from pccfast.diffusion.tiny import random_sd_pipeline

    with quiet_imports():
        from diffusers import LCMScheduler

    tokenizer = build_tiny_tokenizer(label_set)
    text = dict(TINY_TEXT_CONFIG, vocab_size=len(tokenizer))
    unet = dict(TINY_UNET_CONFIG, time_cond_proj_dim=_TINY_LCM_TIME_COND)
    pipe = random_sd_pipeline(unet, TINY_VAE_CONFIG, text, tokenizer, seed=seed, device=device, dtype=dtype)
    pipe.scheduler = LCMScheduler(**{k: v for k, v in SD21_BASE_SCHEDULER_CONFIG.items() if k != "skip_prk_steps"})
    return pipe


# --model name -> builder
TINY_MODELS = {
    "tiny": build_tiny_pipeline,
    "tiny-sdxl": build_tiny_sdxl_pipeline,
    "tiny-turbo": build_tiny_turbo_pipeline,
    "tiny-lcm": build_tiny_lcm_pipeline,
}


def build_tiny_model(name: str, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32, label_set="voc"):
    """The tiny pipeline called ``name`` (a key of ``TINY_MODELS``)."""
    if name not in TINY_MODELS:
        raise ValueError(f"`name` has to be one of {', '.join(TINY_MODELS)} but is {name!r}")
    return TINY_MODELS[name](seed=seed, device=device, dtype=dtype, label_set=label_set)
