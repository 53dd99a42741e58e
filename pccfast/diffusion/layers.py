"""Which attention layers the capture hooks in a diffusers UNet (SD 1.x/2.x, SDXL).

What the UNet adapters (:mod:`pccfast.diffusion.adapters`) know about the UNet's layers lives
here (reference section 1):

* class maps come from every cross-attention (``attn2``) of the down and up blocks (not mid);
* head-wise features come from every self-attention (``attn1``) of the up blocks, lowest
  resolution first;
* a UNet level with N tokens is the latent divided by 2^k (rounded up).

The names are diffusers processor names (the keys of ``unet.attn_processors``, e.g.
``up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor``). SDXL's UNet has the same
naming (several ``transformer_blocks`` per attention, a first level without attention), so its
adapter uses these functions too; the diffusion-transformer adapters (SD3, FLUX) choose their
own layers. Nothing in :mod:`pccfast.diffusion.capture` depends on the UNet's naming.
"""
from __future__ import annotations

import math
import re

__all__ = ["cross_attention_layers", "self_attention_layers", "layer_size"]


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


def layer_size(n_pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h_l, w_l) of the UNet level with ``n_pixels`` tokens: latent size / 2^k, rounded up.

    Args:
        n_pixels: N, the layer's number of query tokens.
        latent_hw: (h, w) latent size.
    """
    h, w = latent_hw
    f = 1
    while f <= max(h, w):
        hl, wl = math.ceil(h / f), math.ceil(w / f)
        if hl * wl == n_pixels:
            return hl, wl
        f *= 2
    raise RuntimeError(f"an attention layer has {n_pixels} tokens, which is no level of a {h}x{w} latent")
