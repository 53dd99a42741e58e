"""Stable Diffusion 2.1-base at full size with random weights, built offline from its configs.

For measuring what needs the real model's shapes but not its weights (speed, memory, host
synchronisations on a GPU): the UNet, VAE and text encoder have SD 2.1-base's sizes (about
865M, 84M and 340M parameters); the tokenizer is the tiny model's own (its ids are a subset of
the 49,408-entry embedding); the scheduler is SD 2.1-base's PNDM. Images are noise and masks
mean nothing. Nothing is downloaded.
"""
from __future__ import annotations

import torch

from pccfast.diffusion.tiny import build_tiny_tokenizer, random_sd_pipeline

__all__ = ["SD21_UNET_CONFIG", "SD21_VAE_CONFIG", "SD21_TEXT_CONFIG", "build_sd21_random_pipeline"]

# stabilityai/stable-diffusion-2-1-base: unet/config.json
SD21_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    upcast_attention=False,
)
# vae/config.json
SD21_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# text_encoder/config.json (OpenCLIP ViT-H/14's text tower)
SD21_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
)


def build_sd21_random_pipeline(seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionPipeline`` with SD 2.1-base's full sizes and seeded random weights."""
    pipe = random_sd_pipeline(SD21_UNET_CONFIG, SD21_VAE_CONFIG, SD21_TEXT_CONFIG, build_tiny_tokenizer(), seed=seed,
                              device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
