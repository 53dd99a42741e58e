"""Tiny, seeded, offline diffusion-transformer pipelines: ``tiny-sd3`` and ``tiny-flux``.

The DiT counterparts of :mod:`pccfast.diffusion.tiny`, for tests and demos: the same
topologies as the real models with tiny widths and seeded random weights, nothing
downloaded.

* ``tiny-sd3``: a ``StableDiffusion3Pipeline`` with SD 3.5's block layout (MM-DiT joint
  attention with RMS q/k norms, a dual-attention first block, the last block text-"pre only"),
  two CLIP text encoders with projections and a T5 encoder, a 16-channel VAE (factor 8) and
  SD 3's flow-matching Euler scheduler (shift 3).
* ``tiny-flux``: a ``FluxPipeline`` with FLUX.1-dev's layout (dual-stream then single-stream
  blocks, RoPE over three id axes, 2x2-packed 16-channel latents, a guidance embedding) and
  FLUX.1-dev's dynamically shifted scheduler; ``tiny-flux-schnell`` has no guidance
  embedding and FLUX.1-schnell's unshifted scheduler (guidance-distilled: no CFG batch).

Tokenizers: the CLIP tokenizer is :func:`pccfast.diffusion.tiny.build_tiny_tokenizer` (the
package's generated vocabulary); the T5-style tokenizer is a SentencePiece-like unigram model
built with the ``tokenizers`` library over the same words (``build_tiny_t5_tokenizer``):
"▁word" pieces for whole words, the parts of ``TINY_SPLIT_WORDS`` as separate pieces (so
multi-token class names occur), letters as the fallback, ``</s>`` appended, ``<pad>`` = 0.
"""
from __future__ import annotations

import torch

from pccfast.diffusion.tiny import TINY_SPLIT_WORDS, build_tiny_tokenizer, tiny_vocab_and_merges

__all__ = [
    "TINY_DIT_MODELS",
    "build_tiny_dit_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_flux_pipeline",
    "build_tiny_t5_tokenizer",
    "tiny_t5_vocab",
]

TINY_DIT_MODELS = ("tiny-sd3", "tiny-flux", "tiny-flux-schnell")

_CLIP_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32)
_T5_TEXT = dict(d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False)

# SD 3.5's transformer with tiny widths: 4 joint blocks, 4 heads of 8 dims, RMS q/k norm, block 0
# with the dual (image-only) attention; CLIP-L + CLIP-G hidden sizes 32 + 32 = 64 channels,
# padded to the T5 width when that is larger (here equal), as SD 3 pads CLIP to 4096.
TINY_SD3_TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8,
                            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                            pooled_projection_dim=64, out_channels=16, pos_embed_max_size=64,
                            dual_attention_layers=(0,), qk_norm="rms_norm")
# FLUX.1's transformer with tiny widths: 2 dual-stream and 2 single-stream blocks, 4 heads of 8
# dims, RoPE axes 2 + 2 + 4 = 8; 16 latent channels packed 2x2 -> 64 input channels.
TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8,
                             num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=(2, 2, 4))
_TINY_DIT_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                     layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=256,
                     use_quant_conv=False, use_post_quant_conv=False)
# VAE latent statistics and scheduler configs of the real checkpoints (their config files)
_SD3_VAE_STATS = dict(scaling_factor=1.5305, shift_factor=0.0609)
_FLUX_VAE_STATS = dict(scaling_factor=0.3611, shift_factor=0.1159)
_SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
_FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
_FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def tiny_t5_vocab(label_set="voc") -> list[tuple[str, float]]:
    """The tiny T5 tokenizer's unigram vocabulary: (piece, log-probability) pairs.

    ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), then "▁word" for every whole word of the tiny
    CLIP vocabulary (class names of VOC, COCO and ``label_set``, common prompt words), the
    parts of ``TINY_SPLIT_WORDS`` (first part word-initial), and single letters with and
    without "▁". Whole words score highest, letters lowest, so a listed word is one piece.
    """
    vocab, _ = tiny_vocab_and_merges(label_set)
    words = [t[: -len("</w>")] for t in vocab if t.endswith("</w>") and len(t) > len("a</w>") and t[:-4].isalpha()]
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -4.0}
    for w in words:
        if w not in TINY_SPLIT_WORDS:
            pieces.setdefault("▁" + w, -5.0)
    for parts in TINY_SPLIT_WORDS.values():
        for i, p in enumerate(parts):
            pieces.setdefault(("▁" if i == 0 else "") + p, -6.0)
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        pieces.setdefault("▁" + c, -9.0)
        pieces.setdefault(c, -10.0)
    return list(pieces.items())


def build_tiny_t5_tokenizer(label_set="voc", max_length: int = 512):
    """A ``T5TokenizerFast`` over ``tiny_t5_vocab`` built with the ``tokenizers`` library
    (lower-casing, "▁" word boundaries, ``</s>`` appended; no download)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram(tiny_t5_vocab(label_set), unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def _clip_text_model(tokenizer, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), **_CLIP_TEXT)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _t5_model(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id, d_model=width,
                      **_T5_TEXT)
    return T5EncoderModel(config).eval()


def _finish(pipe, models, device, dtype):
    """Move to ``device``; cast each model on its own (no empty keep-in-float32 warnings)."""
    pipe = pipe.to(device=device)
    if dtype != torch.float32:
        for model in models:
            torch.nn.Module.to(model, dtype)
    return pipe


def build_tiny_sd3_pipeline(seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32, label_set="voc"):
    """A seeded random-weight ``StableDiffusion3Pipeline`` (SD 3.5 block layout, tiny widths).

    Same seed and label set -> identical weights; the global RNG is forked and restored."""
    from pccfast.diffusion.quiet import quiet_imports

    with quiet_imports():
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip = build_tiny_tokenizer(label_set)
    t5 = build_tiny_t5_tokenizer(label_set, max_length=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER).eval()
        vae = AutoencoderKL(**_TINY_DIT_VAE, **_SD3_VAE_STATS).eval()
        text_encoder = _clip_text_model(clip, True)
        text_encoder_2 = _clip_text_model(clip, True)
        text_encoder_3 = _t5_model(t5, TINY_SD3_TRANSFORMER["joint_attention_dim"])
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**_SD3_SCHEDULER),
                                    vae=vae, text_encoder=text_encoder, tokenizer=clip, text_encoder_2=text_encoder_2,
                                    tokenizer_2=clip, text_encoder_3=text_encoder_3, tokenizer_3=t5)
    return _finish(pipe, (transformer, vae, text_encoder, text_encoder_2, text_encoder_3), device, dtype)


def build_tiny_flux_pipeline(seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32, label_set="voc",
                             schnell: bool = False):
    """A seeded random-weight ``FluxPipeline`` (FLUX.1 block layout, tiny widths).

    Args:
        schnell: FLUX.1-schnell's variant (no guidance embedding, unshifted scheduler) instead
            of FLUX.1-dev's (guidance embedding, dynamically shifted scheduler).
    """
    from pccfast.diffusion.quiet import quiet_imports

    with quiet_imports():
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip = build_tiny_tokenizer(label_set)
    t5 = build_tiny_t5_tokenizer(label_set, max_length=256 if schnell else 512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER, guidance_embeds=not schnell).eval()
        vae = AutoencoderKL(**_TINY_DIT_VAE, **_FLUX_VAE_STATS).eval()
        text_encoder = _clip_text_model(clip, False)
        text_encoder_2 = _t5_model(t5, TINY_FLUX_TRANSFORMER["joint_attention_dim"])
    scheduler = FlowMatchEulerDiscreteScheduler(**(_FLUX_SCHNELL_SCHEDULER if schnell else _FLUX_DEV_SCHEDULER))
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5, transformer=transformer)
    return _finish(pipe, (transformer, vae, text_encoder, text_encoder_2), device, dtype)


def build_tiny_dit_pipeline(name: str, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32, label_set="voc"):
    """``tiny-sd3``, ``tiny-flux`` or ``tiny-flux-schnell`` by name."""
    if name == "tiny-sd3":
        return build_tiny_sd3_pipeline(seed, device, dtype, label_set)
    if name in ("tiny-flux", "tiny-flux-schnell"):
        return build_tiny_flux_pipeline(seed, device, dtype, label_set, schnell=name == "tiny-flux-schnell")
    raise ValueError(f"`name` has to be one of {', '.join(TINY_DIT_MODELS)} but is {name!r}")
