"""Stable Diffusion 2.1-base at full size with random weights, built offline from its configs.

For measuring what needs the real model's shapes but not its weights (speed, memory, host
synchronisations on a GPU): the UNet, VAE and text encoder have SD 2.1-base's sizes (about
865M, 84M and 340M parameters); the tokenizer is the tiny model's own (its ids are a subset of
the 49,408-entry embedding); the scheduler is SD 2.1-base's PNDM. Images are noise and masks
mean nothing. Nothing is downloaded.
"""
from __future__ import annotations

import torch

from pccfast.diffusion.tiny import SD21_BASE_SCHEDULER_CONFIG, build_tiny_tokenizer

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
    from pccfast.diffusion.quiet import quiet_imports

    with quiet_imports():
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0
        from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    text_config = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **SD21_TEXT_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
        vae = AutoencoderKL(**SD21_VAE_CONFIG)
        text_encoder = CLIPTextModel(text_config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=PNDMScheduler(**SD21_BASE_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe = pipe.to(device=device)
    if dtype != torch.float32:  # each model cast on its own (the pipeline's .to(dtype) warns about the VAE)
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            torch.nn.Module.to(model, dtype)  # (diffusers' own .to warns even with nothing to keep in float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
