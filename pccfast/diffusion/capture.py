"""Attention capture during diffusion sampling, reduced on the fly (reference section 1).

``AttentionCapture`` owns the buffers and the step counter of one run over a batch of B images
(denoiser batch ``halves * B``: 2B with classifier-free guidance, unconditional half first; B
without). Used as a context manager it installs the processors that the model adapter
(:mod:`pccfast.diffusion.adapters`; SD 1/2 by default) builds on the layers it selects, with
``set_attn_processor``, and restores the previous processors on exit; the pipeline's
``callback_on_step_end`` advances its step counter.
The step counter is never read inside the UNet (a ``torch.compile``-d UNet would recompile
every step on it): the ``attn1`` processors that record are installed by the callback before
the last step, and the features are reduced by the callback after it. What it keeps:

* per class-map layer: the class-text token probabilities of the unconditional half's queries
  (of the only half without guidance), summed over heads and added into one (B, T, h_l, w_l)
  buffer, so memory does not grow with the steps;
* per feature layer, at the last step: the per-head outputs of every half (unconditional heads
  first), reduced after the step for all layers and images at once by
  ``pca.grouped_headwise_features`` to (B, halves*heads*3, h, w) on the labelling grid (one
  batched PCA per layer shape, no host sync but its finiteness check and ``eigh``).

Listeners (``listeners=``) see every captured layer call and every step end, for extra
captures built on this one (see ``AttentionCapture``).

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
from pccfast.diffusion.processors import class_token_probs
from pccfast.diffusion.tokens import tokens_to_classes

__all__ = ["AttentionCapture", "assemble_class_attention", "check_capture_args", "unconditional_half", "cfg_heads"]


def _check_batch(x: Tensor, batch: int, halves: int) -> None:
    if halves not in (1, 2):
        raise ValueError(f"`halves` has to be 1 or 2 but is {halves}")
    if x.shape[0] != halves * batch:
        what = "classifier-free guidance" if halves == 2 else "no guidance"
        raise RuntimeError(f"the capture expects a UNet batch of {halves} * {batch} ({what}) but got {x.shape[0]}")


def unconditional_half(x: Tensor, batch: int, halves: int = 2) -> Tensor:
    """The half whose queries give the class maps: with guidance (``halves`` 2) the first,
    unconditional (or negative-prompt) half, x (2B, ...) -> (B, ...); without, x (B, ...) itself."""
    _check_batch(x, batch, halves)
    return x[:batch]


def cfg_heads(per_head: Tensor, batch: int, halves: int = 2) -> Tensor:
    """Every half's heads side by side: per_head (halves*B, heads, N, d) -> (B, halves*heads, N, d),
    unconditional heads first (the reference's layer batch)."""
    _check_batch(per_head, batch, halves)
    _, heads, n, d = per_head.shape
    x = per_head.view(halves, batch, heads, n, d).transpose(0, 1)  # (B, halves, heads, N, d)
    return x.reshape(batch, halves * heads, n, d)  # (B, halves*heads, N, d)


def check_capture_args(class_embeds: Tensor, class_mask: Tensor, num_steps: int, halves: int) -> None:
    """What every capture takes: class_embeds (B, T, C) with class_mask (B, T), ``num_steps``
    >= 1 denoiser calls, ``halves`` 1 or 2."""
    if class_embeds.ndim != 3 or tuple(class_mask.shape) != tuple(class_embeds.shape[:2]):
        raise ValueError(
            f"`class_embeds` (B, T, C) and `class_mask` (B, T) have to agree but have shapes "
            f"{tuple(class_embeds.shape)} and {tuple(class_mask.shape)}"
        )
    if num_steps < 1:
        raise ValueError(f"`num_steps` has to be at least 1 but is {num_steps}")
    if halves not in (1, 2):
        raise ValueError(f"`halves` has to be 1 or 2 but is {halves}")


class AttentionCapture:
    """Buffers and processors of one capture run over a batch of B images.

    Args:
        unet: the denoiser (``adapter.denoiser``; any module with ``attn_processors`` and
            ``set_attn_processor``).
        class_embeds: (B, T, C) class-text embeddings, zero-padded to the longest text.
        class_mask: (B, T) bool, True for real tokens (padding is masked before the softmax).
        num_steps: denoiser calls of the run (counted from the scheduler); the last one is captured.
        latent_hw: (h, w) latent size (the layers' sizes are found from it).
        cfg: PCA settings for ``headwise_features``.
        adapter: the ``ModelAdapter`` that picks the layers and builds the processors (None:
            Stable Diffusion 1/2's layers of ``unet``).
        halves: 2 with classifier-free guidance (denoiser batch 2B, unconditional half first),
            1 without (batch B).
        grid_hw: (h, w) labelling grid of the features (default: ``latent_hw``).
        listeners: objects told of every captured layer call and step end, for extra captures:
            ``on_attention(capture, name, kind, attn, query, key, per_head)`` with ``kind``
            "self" (feature layers) or "cross" (class-map layers) and (halves*B, heads, L, d)
            tensors (key (halves*B, heads, L_k, d)); ``on_step_end(capture, step)`` after each
            denoiser call (``step`` = calls done). Either method may be absent.

    Use as ``with capture: pipe(..., callback_on_step_end=capture.on_step_end)``.
    """

    def __init__(self, unet, class_embeds: Tensor, class_mask: Tensor, num_steps: int, latent_hw,
                 cfg: Optional[PCCConfig] = None, *, adapter=None, halves: int = 2, grid_hw=None, listeners=()):
        check_capture_args(class_embeds, class_mask, num_steps, halves)
        if adapter is None:
            from pccfast.diffusion.adapters import StableDiffusionAdapter

            adapter = StableDiffusionAdapter(None, denoiser=unet)
        self.unet = unet
        self.adapter = adapter
        self.class_embeds, self.class_mask = class_embeds, class_mask.bool()
        self.batch = class_embeds.shape[0]
        self.halves = int(halves)
        self.num_steps = int(num_steps)
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.grid_hw = self.latent_hw if grid_hw is None else (int(grid_hw[0]), int(grid_hw[1]))
        self.cfg = cfg or PCCConfig()
        self.listeners = tuple(listeners)
        self.step = 0
        self.cross_layers = list(adapter.class_map_layers())
        self.self_layers = list(adapter.feature_layers())
        self.class_maps: dict[str, Tensor] = {}  # name -> (B, T, h_l, w_l), summed over steps and heads
        self.head_inputs: dict[str, Tensor] = {}  # name -> (halves*B, heads, N, d), last step, until reduced
        self.head_features: dict[str, Tensor] = {}  # name -> (B, halves*heads*c, h, w), last step
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
        for listener in self.listeners:
            if hasattr(listener, "on_step_end"):
                listener.on_step_end(self, self.step)
        return callback_kwargs

    # --- installation
    def processors(self, record: bool = False) -> dict:
        """Every processor of the UNet, the captured layers replaced (for ``set_attn_processor``);
        the feature layers' processors record the per-head outputs if ``record`` (the last step).
        The class-map processors already installed are kept (the same objects every step)."""
        procs = dict(self.unet.attn_processors)
        for name in self.cross_layers:
            if getattr(procs[name], "capture", None) is not self:
                procs[name] = self.adapter.class_processor(self, name)
        for name in self.self_layers:
            procs[name] = self.adapter.feature_processor(self, name, record)
        return procs

    def __enter__(self) -> "AttentionCapture":
        self._saved = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(self.processors(record=self.is_last_step))
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(dict(self._saved))
        self._saved = None

    # --- what the processors hand over
    def notify(self, name: str, kind: str, attn, query: Tensor, key: Tensor, per_head: Tensor) -> None:
        """Tells the listeners of one layer call (see the class docstring)."""
        for listener in self.listeners:
            if hasattr(listener, "on_attention"):
                listener.on_attention(self, name, kind, attn, query, key, per_head)

    def add_class_scores(self, name: str, attn, query: Tensor) -> None:
        """query: (halves*B, heads, N, d) -> adds the class-token probabilities of the
        unconditional (or only) half, summed over heads, to ``class_maps[name]`` (B, T, h_l, w_l)."""
        q = unconditional_half(query, self.batch, self.halves)  # (B, heads, N, d)
        b, _, n, _ = q.shape
        probs = class_token_probs(attn, q, self.class_embeds, self.class_mask)  # (B, N, T)
        hl, wl = self.adapter.level_hw(n, self.latent_hw)
        maps = probs.transpose(1, 2).reshape(b, -1, hl, wl)  # (B, T, h_l, w_l)
        if name in self.class_maps:
            self.class_maps[name] += maps
        else:
            self.class_maps[name] = maps

    def add_head_features(self, name: str, per_head: Tensor) -> None:
        """per_head: (halves*B, heads, N, d) -> kept in ``head_inputs[name]`` until
        ``reduce_head_features``."""
        _check_batch(per_head, self.batch, self.halves)
        self.head_inputs[name] = per_head

    def reduce_head_features(self) -> None:
        """``head_inputs`` -> ``head_features[name]`` (B, halves*heads*c, h, w), all layers and
        images in one ``grouped_headwise_features`` call (per item a generator seeded with
        ``cfg.pca_seed``, so an image's features do not depend on its batch)."""
        if not self.head_inputs:
            return
        names = [n for n in self.self_layers if n in self.head_inputs] + [
            n for n in self.head_inputs if n not in self.self_layers]
        xs = [cfg_heads(self.head_inputs[n], self.batch, self.halves) for n in names]  # (B, halves*heads, N, d) each
        sizes = [self.adapter.level_hw(x.shape[2], self.latent_hw) for x in xs]  # (h_l, w_l) each
        self.head_features.update(zip(names, grouped_headwise_features(xs, self.grid_hw, self.cfg, sizes)))
        self.head_inputs = {}

    # --- assembly after the loop
    def features(self) -> Tensor:
        """(B, D, h, w): the feature layers' features on the grid, in layer order."""
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

