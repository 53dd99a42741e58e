"""Attention capture during Stable Diffusion sampling, reduced on the fly (reference section 1).

``AttentionCapture`` owns the buffers and the step counter of one run over a batch of B images
(UNet batch 2B, classifier-free guidance). Used as a context manager it installs the
processors of :mod:`pccfast.diffusion.processors` on the layers that
:mod:`pccfast.diffusion.layers` selects, with ``unet.set_attn_processor``, and restores the
previous processors on exit; the pipeline's ``callback_on_step_end`` advances its step counter.
The step counter is never read inside the UNet (a ``torch.compile``-d UNet would recompile
every step on it): the ``attn1`` processors that record are installed by the callback before
the last step, and the features are reduced by the callback after it. What it keeps:

* per ``attn2`` layer: the unconditional CFG half's class-text token probabilities, summed over
  heads and added into one (B, T, h_l, w_l) buffer, so memory does not grow with the steps;
* per ``attn1`` layer, at the last step: the per-head outputs of both CFG halves (unconditional
  heads first), reduced after the step for all layers and images at once by
  ``pca.grouped_headwise_features`` to (B, 2*heads*3, grid, grid) (one batched PCA per layer
  shape, no host sync but its finiteness check and ``eigh``).

``assemble_class_attention`` turns the per-layer token maps into class maps on the labelling
grid (the reference's resampling).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pccfast.core.config import PCCConfig
from pccfast.core.pca import grouped_headwise_features
from pccfast.core.resize import resize
from pccfast.diffusion.layers import cross_attention_layers, layer_size, self_attention_layers
from pccfast.diffusion.processors import ClassAttentionProcessor, HeadFeatureProcessor, class_token_probs
from pccfast.diffusion.tokens import tokens_to_classes

__all__ = ["AttentionCapture", "assemble_class_attention", "unconditional_half", "cfg_heads"]


def unconditional_half(x: Tensor, batch: int) -> Tensor:
    """The first (unconditional) CFG half of a UNet batch: x (2B, ...) -> (B, ...)."""
    if x.shape[0] != 2 * batch:
        raise RuntimeError(
            f"the capture expects a UNet batch of 2 * {batch} (classifier-free guidance) but got {x.shape[0]}"
        )
    return x[:batch]


def cfg_heads(per_head: Tensor, batch: int) -> Tensor:
    """Both CFG halves' heads side by side: per_head (2B, heads, N, d) -> (B, 2*heads, N, d),
    unconditional heads first (the reference's layer batch)."""
    unconditional_half(per_head, batch)  # batch check
    _, heads, n, d = per_head.shape
    x = per_head.view(2, batch, heads, n, d).transpose(0, 1)  # (B, 2, heads, N, d)
    return x.reshape(batch, 2 * heads, n, d)  # (B, 2*heads, N, d)


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
        self.class_maps: dict[str, Tensor] = {}  # name -> (B, T, h_l, w_l), summed over steps and heads
        self.head_inputs: dict[str, Tensor] = {}  # name -> (2B, heads, N, d), last step, until reduced
        self.head_features: dict[str, Tensor] = {}  # name -> (B, 2*heads*c, grid, grid), last step
        self._saved = None

    # --- step bookkeeping
    @property
    def is_last_step(self) -> bool:
        return self.step == self.num_steps - 1

    def on_step_end(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` of the pipeline: step i is done, the next UNet call is i + 1.
        Before the last call it installs the recording ``attn1`` processors; after it, it
        reduces what they recorded (``reduce_head_features``)."""
        self.step = i + 1
        if self.is_last_step and self._saved is not None:
            self.unet.set_attn_processor(self.processors(record=True))
        elif self.step == self.num_steps:
            self.reduce_head_features()
        return callback_kwargs

    # --- installation
    def processors(self, record: bool = False) -> dict:
        """Every processor of the UNet, the captured layers replaced (for ``set_attn_processor``);
        the ``attn1`` processors record the per-head outputs if ``record`` (the last step)."""
        procs = dict(self.unet.attn_processors)
        for name in self.cross_layers:
            if not isinstance(procs[name], ClassAttentionProcessor) or procs[name].capture is not self:
                procs[name] = ClassAttentionProcessor(self, name)
        for name in self.self_layers:
            procs[name] = HeadFeatureProcessor(self, name, record=record)
        return procs

    def __enter__(self) -> "AttentionCapture":
        self._saved = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(self.processors(record=self.is_last_step))
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(dict(self._saved))
        self._saved = None

    # --- what the processors hand over
    def add_class_scores(self, name: str, attn, query: Tensor) -> None:
        """query: (2B, heads, N, d) -> adds the class-token probabilities, summed over heads,
        to ``class_maps[name]`` (B, T, h_l, w_l)."""
        q = unconditional_half(query, self.batch)  # (B, heads, N, d)
        b, _, n, _ = q.shape
        probs = class_token_probs(attn, q, self.class_embeds, self.class_mask)  # (B, N, T)
        hl, wl = layer_size(n, self.latent_hw)
        maps = probs.transpose(1, 2).reshape(b, -1, hl, wl)  # (B, T, h_l, w_l)
        if name in self.class_maps:
            self.class_maps[name] += maps
        else:
            self.class_maps[name] = maps

    def add_head_features(self, name: str, per_head: Tensor) -> None:
        """per_head: (2B, heads, N, d) -> kept in ``head_inputs[name]`` until
        ``reduce_head_features``."""
        unconditional_half(per_head, self.batch)  # batch check
        self.head_inputs[name] = per_head

    def reduce_head_features(self) -> None:
        """``head_inputs`` -> ``head_features[name]`` (B, 2*heads*c, grid, grid), all layers and
        images in one ``grouped_headwise_features`` call (per item a generator seeded with
        ``cfg.pca_seed``, so an image's features do not depend on its batch)."""
        if not self.head_inputs:
            return
        names = [n for n in self.self_layers if n in self.head_inputs] + [
            n for n in self.head_inputs if n not in self.self_layers]
        xs = [cfg_heads(self.head_inputs[n], self.batch) for n in names]  # (B, 2*heads, N, d) each
        self.head_features.update(zip(names, grouped_headwise_features(xs, self.latent_hw[0], self.cfg)))
        self.head_inputs = {}

    # --- assembly after the loop
    def features(self) -> Tensor:
        """(B, D, grid, grid): the self-attention layers' features, in layer order."""
        self.reduce_head_features()  # when the pipeline's callback was not the capture's
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
        r = resize(m.float(), (h, w), mode="bilinear")  # (B, T, h, w)
        acc = r if acc is None else acc + r
    up = resize(acc, (big_h, big_w), mode="bilinear")  # (B, T, H, W)
    b, t = up.shape[:2]
    pooled = up.reshape(b, t, h, big_h // h, w, big_w // w).sum(dim=(3, 5))  # (B, T, h, w)
    return tokens_to_classes(pooled, token_classes, num_classes)

