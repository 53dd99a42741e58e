"""The training recipe: one dataclass, with the published protocols as presets.

- ``syntagen``: the SyntaGen 2024 challenge's protocol: DeepLabv3-ResNet-50, at most 10,000
  image/mask pairs, 100,000 iterations at batch 8, 512x512 crops. The challenge fixes those;
  the optimiser is mmsegmentation's DeepLabv3 schedule (SGD, lr 0.01, momentum 0.9, weight
  decay 5e-4, poly power 0.9 down to 1e-4, auxiliary loss 0.4).
- ``dd``: Dataset Diffusion's mmsegmentation configs (``deeplabv3_r101_genvoc_20k_adamw``):
  DeepLabv3-ResNet-101, AdamW (lr 1e-4, weight decay 1e-4, betas 0.9/0.999, eps 1e-8),
  backbone lr x0.1, gradient norm clipped at 0.01, poly power 0.9 down to 0, 20,000
  iterations (its COCO config: 40,000, ``--iters 40000``), batch 4 (its dataset file's batch
  per GPU), 512 crops, random resize 0.5-2.0, evaluation every 1,000 iterations.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pccfast.training.models import ARCHS

__all__ = ["TrainConfig", "PRESETS", "preset", "RUN_DEFINING"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (the syntagen preset's values by default)."""

    arch: str = "deeplabv3_resnet50"  # one of models.ARCHS
    iters: int = 100_000  # optimiser steps
    batch: int = 8  # global batch (split over DDP ranks)
    crop: int = 512  # square training crop side
    max_pairs: int | None = 10_000  # use at most this many training pairs (the first in id order); None = all
    optimizer: str = "sgd"  # sgd (momentum) or adamw
    lr: float = 0.01  # base learning rate (heads; the backbone gets lr * backbone_lr_mult)
    min_lr: float = 1e-4  # the poly schedule ends here
    poly_power: float = 0.9  # lr = (lr - min_lr) * (1 - it / iters) ** poly_power + min_lr
    momentum: float = 0.9  # SGD momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 5e-4  # weight decay of every parameter
    backbone_lr_mult: float = 1.0  # the backbone's lr factor
    grad_clip: float | None = None  # clip the gradient's global L2 norm to this; None = no clipping
    aux_weight: float = 0.4  # weight of the auxiliary head's loss
    bn_momentum: float | None = None  # momentum of every batch norm; None keeps the model's (0.1, MobileNetV3 0.01)
    scale_min: float = 0.5  # random resize: the short side becomes crop * U(scale_min, scale_max)
    scale_max: float = 2.0
    flip: bool = True  # random horizontal flip (p = 0.5)
    ema_decay: float | None = None  # EMA of the weights (e.g. 0.999); evaluated and predicted with; None = off
    seed: int = 0  # data order, augmentation, initialisation and dropout all derive from it
    eval_every: int = 10_000  # evaluate on --val every this many iterations (and at the end)
    checkpoint_every: int = 1_000  # write RUN_DIR/last.pt every this many iterations (and at Ctrl-C, at the end)
    log_every: int = 20  # one log line (loss, lr, img/s) every this many iterations
    amp: bool = True  # float16 autocast and a gradient scaler on CUDA (ignored on the CPU)

    def __post_init__(self):
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"`{name}` has to be {rule} but is {getattr(self, name)!r}")

        need(self.arch in ARCHS, "arch", "one of " + ", ".join(ARCHS))
        for name in ("iters", "batch", "crop", "eval_every", "checkpoint_every", "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "a positive int")
        need(self.batch >= 2, "batch", "at least 2 (batch norm needs 2 images per step)")
        need(self.crop >= 32, "crop", "at least 32")
        need(self.max_pairs is None or self.max_pairs >= 1, "max_pairs", "a positive int or None")
        need(self.optimizer in ("sgd", "adamw"), "optimizer", "sgd or adamw")
        need(self.lr > 0, "lr", "positive")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"between 0 and lr ({self.lr})")
        need(self.poly_power > 0, "poly_power", "positive")
        need(0 < self.scale_min <= self.scale_max, "scale_min", f"positive and at most scale_max ({self.scale_max})")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "positive or None")
        need(self.aux_weight >= 0, "aux_weight", "non-negative")
        need(self.bn_momentum is None or 0 < self.bn_momentum <= 1, "bn_momentum", "in (0, 1] or None")
        need(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "between 0 and 1 (exclusive) or None")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**kw)

    def lr_at(self, iteration: int) -> float:
        """The poly schedule's learning rate for step ``iteration`` (0-based)."""
        frac = min(max(iteration / self.iters, 0.0), 1.0)
        return (self.lr - self.min_lr) * (1.0 - frac) ** self.poly_power + self.min_lr


# fields that may change between a run and its resumption (the rest define the run)
_RESUMABLE = {"eval_every", "checkpoint_every", "log_every"}
RUN_DEFINING = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _RESUMABLE)

PRESETS = {
    "syntagen": TrainConfig(),
    "dd": TrainConfig(arch="deeplabv3_resnet101", iters=20_000, batch=4, crop=512, max_pairs=None, optimizer="adamw",
                      lr=1e-4, min_lr=0.0, weight_decay=1e-4, backbone_lr_mult=0.1, grad_clip=0.01,
                      eval_every=1_000),
}


def preset(name: str, **overrides) -> TrainConfig:
    """A preset with ``overrides`` (None values are ignored) applied."""
    if name not in PRESETS:
        raise ValueError(f"`preset` has to be one of {', '.join(sorted(PRESETS))} but is {name!r}")
    return PRESETS[name].replace(**{k: v for k, v in overrides.items() if v is not None})
