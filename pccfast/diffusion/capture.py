"""Attention capture during Stable Diffusion sampling, reduced on the fly (reference section 1).

Two diffusers attention processors compute every attention output exactly as
``AttnProcessor2_0`` does (the images do not change) and keep, in passing:

* ``ClassAttentionProcessor`` (every ``attn2`` of the down and up blocks): the unconditional
  CFG half's queries scored against the keys of each image's *class text*, softmax over the
  tokens, summed over heads, and added into one (B, T, h_l, w_l) buffer per layer, so memory
  does not grow with the number of steps.
* ``HeadFeatureProcessor`` (every ``attn1`` of the up blocks): at the last denoising step, the
  per-head output ``softmax(Q K^T * scale) V`` of both CFG halves (unconditional heads first),
  reduced at once by ``pca.headwise_features`` to (B, 2*heads*3, grid, grid).

``AttentionCapture`` owns the buffers and processors; used as a context manager it installs
them with ``unet.set_attn_processor`` and restores the previous processors on exit. The
pipeline's ``callback_on_step_end`` advances its step counter. ``generate_with_capture`` runs a
batch of prompts through the pipeline with the capture installed and assembles ``features``
and ``class_attention`` for the labeller.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pccfast.core.config import PCCConfig
from pccfast.core.labelset import as_label_set
from pccfast.core.pca import headwise_features
from pccfast.diffusion.tokens import batch_class_tokens, tokens_to_classes

__all__ = [
    "CaptureOutput",
    "AttentionCapture",
    "ClassAttentionProcessor",
    "HeadFeatureProcessor",
    "attend",
    "cross_attention_layers",
    "self_attention_layers",
    "assemble_class_attention",
    "encode_class_texts",
    "generate_with_capture",
]


@dataclass
class CaptureOutput:
    """What one capture run returns (all on the pipeline's device)."""

    images: Tensor  # (B, 3, H, W) uint8
    features: Tensor  # (B, D, h, w) float32, D = 3 * sum over up-block attn1 layers of 2*heads
    class_attention: Tensor  # (B, K, h, w) float32, K = label-set classes, 0 = background


# ---------------------------------------------------------------------------------------------
# The attention computation (as AttnProcessor2_0), exposing the queries and per-head outputs


def attend(attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None, temb=None):
    """Attention of a diffusers ``Attention`` layer, computed as ``AttnProcessor2_0`` does.

    Args:
        attn: the ``Attention`` module.
        hidden_states: (N_b, L, C) or (N_b, C, h, w).
        encoder_hidden_states: (N_b, L_k, C_k) for cross-attention, None for self-attention.

    Returns:
        out: the layer output (same shape as ``hidden_states``);
        query: (N_b, heads, L, d) queries after ``to_q`` (and ``norm_q``);
        per_head: (N_b, heads, L, d) ``softmax(Q K^T * scale) V`` before merging heads.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    four_d = hidden_states.ndim == 4
    if four_d:
        n_b, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(n_b, channels, height * width).transpose(1, 2)  # (N_b, L, C)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    n_b, ctx_len, _ = context.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, ctx_len, n_b)
        attention_mask = attention_mask.view(n_b, attn.heads, -1, attention_mask.shape[-1])  # (N_b, heads, L|1, L_k)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)  # (N_b, L, inner)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)  # (N_b, L_k, inner)
    value = attn.to_v(encoder_hidden_states)  # (N_b, L_k, inner)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(n_b, -1, attn.heads, head_dim).transpose(1, 2)  # (N_b, heads, L, d)
    key = key.view(n_b, -1, attn.heads, head_dim).transpose(1, 2)  # (N_b, heads, L_k, d)
    value = value.view(n_b, -1, attn.heads, head_dim).transpose(1, 2)  # (N_b, heads, L_k, d)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    per_head = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
    )  # (N_b, heads, L, d)
    out = per_head.transpose(1, 2).reshape(n_b, -1, attn.heads * head_dim).to(query.dtype)  # (N_b, L, inner)
    out = attn.to_out[0](out)  # linear projection
    out = attn.to_out[1](out)  # dropout
    if four_d:
        out = out.transpose(-1, -2).reshape(n_b, channels, height, width)
    if attn.residual_connection:
        out = out + residual
    out = out / attn.rescale_output_factor
    return out, query, per_head


# ---------------------------------------------------------------------------------------------
# Layers


def _layer_key(name: str) -> tuple:
    """Sort key: numbers compared as numbers ('up_blocks.10' after 'up_blocks.2')."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[._]", name))


def cross_attention_layers(unet) -> list[str]:
    """Processor names of every ``attn2`` in the down and up blocks (not mid), in block order."""
    names = [n for n in unet.attn_processors if n.startswith(("down_blocks.", "up_blocks.")) and ".attn2." in n]
    return sorted(names, key=_layer_key)


def self_attention_layers(unet) -> list[str]:
    """Processor names of every ``attn1`` in the up blocks, lowest resolution first (block order)."""
    names = [n for n in unet.attn_processors if n.startswith("up_blocks.") and ".attn1." in n]
    return sorted(names, key=_layer_key)


def _layer_size(n_pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h_l, w_l) of a UNet level with ``n_pixels`` tokens: latent size / 2^k, rounded up."""
    h, w = latent_hw
    f = 1
    while f <= max(h, w):
        hl, wl = math.ceil(h / f), math.ceil(w / f)
        if hl * wl == n_pixels:
            return hl, wl
        f *= 2
    raise RuntimeError(f"an attention layer has {n_pixels} tokens, which is no level of a {h}x{w} latent")


# ---------------------------------------------------------------------------------------------
# Processors (thin: they hold a reference to the capture and their layer name)


class ClassAttentionProcessor:
    """``attn2`` processor: normal output, plus class-text scores of the unconditional queries
    summed into ``capture.class_maps[name]`` (B, T, h_l, w_l)."""

    def __init__(self, capture: "AttentionCapture", name: str):
        self.capture, self.name = capture, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        out, query, _ = attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.capture._add_class_scores(self.name, attn, query)
        return out


class HeadFeatureProcessor:
    """``attn1`` processor: normal output; at the last step also the head-wise PCA features of
    the per-head outputs into ``capture.head_features[name]`` (B, 2*heads*c, grid, grid)."""

    def __init__(self, capture: "AttentionCapture", name: str):
        self.capture, self.name = capture, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        out, _, per_head = attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.capture.is_last_step:
            self.capture._add_head_features(self.name, per_head)
        return out


# ---------------------------------------------------------------------------------------------
# The capture


class AttentionCapture:
    """Buffers and processors of one capture run over a batch of B images (UNet batch 2B, CFG).

    Args:
        unet: the pipeline's UNet.
        class_embeds: (B, T, C) class-text embeddings, zero-padded to the longest text.
        class_mask: (B, T) bool, True for real tokens (padding is masked before the softmax).
        num_steps: UNet calls of the run (``len(scheduler.timesteps)``); the last one is captured.
        latent_hw: (h, w) latent size; also the labelling grid.
        cfg: PCA settings for ``headwise_features``.

    Use as ``with capture: pipe(..., callback_on_step_end=capture.on_step_end)``.
    """

    def __init__(self, unet, class_embeds: Tensor, class_mask: Tensor, num_steps: int, latent_hw, cfg: Optional[PCCConfig] = None):
        if class_embeds.ndim != 3 or class_mask.shape != class_embeds.shape[:2]:
            raise ValueError(
                f"`class_embeds` (B, T, C) and `class_mask` (B, T) have to agree but have shapes "
                f"{tuple(class_embeds.shape)} and {tuple(class_mask.shape)}"
            )
        if num_steps < 1:
            raise ValueError(f"`num_steps` has to be at least 1 but is {num_steps}")
        self.unet = unet
        self.class_embeds, self.class_mask = class_embeds, class_mask.bool()
        self.batch = class_embeds.shape[0]
        self.num_steps = int(num_steps)
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.cfg = cfg or PCCConfig()
        self.step = 0
        self.cross_layers = cross_attention_layers(unet)
        self.self_layers = self_attention_layers(unet)
        self.class_maps: dict[str, Tensor] = {}
        self.head_features: dict[str, Tensor] = {}
        self._saved = None

    # --- step bookkeeping
    @property
    def is_last_step(self) -> bool:
        return self.step == self.num_steps - 1

    def on_step_end(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` of the pipeline: step i is done, the next UNet call is i + 1."""
        self.step = i + 1
        return callback_kwargs

    # --- installation
    def processors(self) -> dict:
        """Every processor of the UNet, the captured layers replaced (for ``set_attn_processor``)."""
        procs = dict(self.unet.attn_processors)
        for name in self.cross_layers:
            procs[name] = ClassAttentionProcessor(self, name)
        for name in self.self_layers:
            procs[name] = HeadFeatureProcessor(self, name)
        return procs

    def __enter__(self) -> "AttentionCapture":
        self._saved = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(self.processors())
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(dict(self._saved))
        self._saved = None

    # --- what the processors add
    def _uncond(self, x: Tensor) -> Tensor:
        """First (unconditional) CFG half of a (2B, ...) UNet batch."""
        if x.shape[0] != 2 * self.batch:
            raise RuntimeError(
                f"the capture expects a UNet batch of 2 * {self.batch} (classifier-free guidance) but got {x.shape[0]}"
            )
        return x[: self.batch]

    def _add_class_scores(self, name: str, attn, query: Tensor) -> None:
        """query: (2B, heads, N, d) -> adds softmax over class tokens, summed over heads, to (B, T, h_l, w_l)."""
        q = self._uncond(query).float()  # (B, heads, N, d)
        b, heads, n, d = q.shape
        ctx = self.class_embeds.to(attn.to_k.weight.dtype)
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        key = attn.to_k(ctx)  # (B, T, inner)
        key = key.view(b, -1, heads, d).transpose(1, 2)  # (B, heads, T, d)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scores = (q @ key.float().transpose(-1, -2)) * attn.scale  # (B, heads, N, T)
        scores = scores.masked_fill(~self.class_mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).sum(dim=1)  # (B, N, T)
        hl, wl = _layer_size(n, self.latent_hw)
        maps = probs.transpose(1, 2).reshape(b, -1, hl, wl)  # (B, T, h_l, w_l)
        if name in self.class_maps:
            self.class_maps[name] += maps
        else:
            self.class_maps[name] = maps

    def _add_head_features(self, name: str, per_head: Tensor) -> None:
        """per_head: (2B, heads, N, d) -> (B, 2*heads*c, grid, grid), unconditional heads first."""
        self._uncond(per_head)  # batch check
        two_b, heads, n, d = per_head.shape
        x = per_head.view(2, self.batch, heads, n, d).transpose(0, 1)  # (B, 2, heads, N, d)
        x = x.reshape(self.batch, 2 * heads, n, d)  # (B, 2*heads, N, d), uncond heads first
        grid = self.latent_hw[0]
        # One call per image, each with a fresh generator seeded with cfg.pca_seed, so an image's
        # features do not depend on the batch it was generated in.
        self.head_features[name] = torch.cat([headwise_features(x[i : i + 1], grid, self.cfg) for i in range(self.batch)])

    # --- assembly after the loop
    def features(self) -> Tensor:
        """(B, D, grid, grid): the up-block attn1 layers' features, in layer order."""
        missing = [n for n in self.self_layers if n not in self.head_features]
        if missing:
            raise RuntimeError(
                f"no last-step features were captured for {len(missing)} layers (e.g. {missing[0]}); "
                f"the run made {self.step} of {self.num_steps} steps"
            )
        return torch.cat([self.head_features[n] for n in self.self_layers], dim=1)

    def token_maps(self) -> list[Tensor]:
        """Per-layer class-token maps (B, T, h_l, w_l), summed over steps and heads, layer order."""
        missing = [n for n in self.cross_layers if n not in self.class_maps]
        if missing:
            raise RuntimeError(f"no class scores were captured for {len(missing)} layers (e.g. {missing[0]})")
        return [self.class_maps[n] for n in self.cross_layers]


def assemble_class_attention(
    layer_maps: list, token_classes: Tensor, num_classes: int, grid_hw, image_hw
) -> Tensor:
    """Class maps on the labelling grid from per-layer token maps (the reference's resampling).

    Args:
        layer_maps: per layer (B, T, h_l, w_l) maps (summed over steps and heads).
        token_classes: (B, T) long class per token (``tokens.DROP`` for EoT and padding).
        num_classes: K.
        grid_hw: (h, w) labelling grid (the latent size).
        image_hw: (H, W) image size, multiples of (h, w).

    Returns:
        (B, K, h, w) float32: every layer resized bilinearly (align_corners=False) to (h, w) and
        summed, resized bilinearly to (H, W), sum-pooled over (H/h x W/w) blocks; then the max
        over each class's tokens (zeros for classes without tokens).
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    big_h, big_w = int(image_hw[0]), int(image_hw[1])
    if big_h % h or big_w % w:
        raise ValueError(f"`image_hw` {big_h}x{big_w} has to be a multiple of `grid_hw` {h}x{w}")
    acc = None
    for m in layer_maps:
        r = F.interpolate(m.float(), size=(h, w), mode="bilinear", align_corners=False)  # (B, T, h, w)
        acc = r if acc is None else acc + r
    up = F.interpolate(acc, size=(big_h, big_w), mode="bilinear", align_corners=False)  # (B, T, H, W)
    b, t = up.shape[:2]
    pooled = up.view(b, t, h, big_h // h, w, big_w // w).sum(dim=(3, 5))  # (B, T, h, w)
    return tokens_to_classes(pooled, token_classes, num_classes)


# ---------------------------------------------------------------------------------------------
# One batch through the pipeline


@torch.no_grad()
def encode_class_texts(pipe, class_names: list, label_set):
    """Class-text embeddings with the pipeline's own tokenizer and text encoder.

    Each text is encoded on its own, unpadded (as the reference does), then zero-padded to the
    longest text of the batch.

    Returns:
        embeds (B, T, C) in the UNet's dtype, mask (B, T) bool, ``tokens.ClassTokens``.
    """
    device = pipe._execution_device
    tok = batch_class_tokens(pipe.tokenizer, class_names, label_set, device=device)
    lengths = tok.mask.sum(dim=1).tolist()
    rows = [pipe.text_encoder(tok.ids[i : i + 1, : lengths[i]])[0][0] for i in range(len(lengths))]  # (T_i, C)
    embeds = torch.zeros(len(rows), tok.ids.shape[1], rows[0].shape[-1], device=device, dtype=pipe.unet.dtype)
    for i, r in enumerate(rows):
        embeds[i, : r.shape[0]] = r.to(embeds.dtype)
    return embeds, tok.mask, tok


def _count_unet_calls(scheduler, steps: int, device) -> int:
    """UNet calls of a run with ``steps`` inference steps (PNDM makes one more), on a copy."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps, device=device)
    return len(sched.timesteps)


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
) -> CaptureOutput:
    """Generate a batch of images with attention capture (one pipeline call for the batch).

    Args:
        pipe: a diffusers ``StableDiffusionPipeline``.
        prompts: B prompts.
        class_names: per image, its class names (label-set names; order and repeats kept).
        label_set: name, path or ``LabelSet`` (K classes).
        seeds: B seeds; image i's latents come from ``torch.Generator(device).manual_seed(seeds[i])``,
            so a prompt gives the same image whatever batch it is in.
        steps, guidance, height, width: diffusion settings (guidance > 1: the captures use
            the unconditional CFG half; height == width, multiples of 8).
        cfg: PCA settings (reference defaults when None).
        generator_device: device of the seed generators (default: the pipeline's device).
        progress: show the pipeline's per-step progress bar.

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
    factor = getattr(pipe, "vae_scale_factor", 8)
    if height != width or height % factor or height < factor:
        raise ValueError(
            f"`height` and `width` have to be equal positive multiples of {factor} (square features) but are {height} and {width}"
        )
    if steps < 1:
        raise ValueError(f"`steps` has to be at least 1 but is {steps}")
    ls = as_label_set(label_set)
    device = pipe._execution_device
    latent_hw = (height // factor, width // factor)
    embeds, mask, tok = encode_class_texts(pipe, class_names, ls)
    gen_device = torch.device(generator_device) if generator_device is not None else device
    generators = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in seeds]
    capture = AttentionCapture(pipe.unet, embeds, mask, _count_unet_calls(pipe.scheduler, steps, device), latent_hw, cfg)
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**saved_bar, "disable": not progress})
    try:
        with capture:
            out = pipe(
                prompt=list(prompts),
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="pt",
                callback_on_step_end=capture.on_step_end,
            )
    finally:
        pipe._progress_bar_config = saved_bar
    if capture.step != capture.num_steps:
        raise RuntimeError(f"the pipeline made {capture.step} denoising steps but {capture.num_steps} were expected")
    images = (out.images * 255).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)
    features = capture.features()
    class_attention = assemble_class_attention(capture.token_maps(), tok.classes, ls.num_classes, latent_hw, (height, width))
    return CaptureOutput(images=images, features=features, class_attention=class_attention)
