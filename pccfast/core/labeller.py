"""The PCC labeller: attention features + class maps + images -> refined label masks.

``label_images`` runs section 2 (blocky mask on the feature grid), upsamples it (nearest) to
the image size and, if ``cfg.refine``, runs section 3 with the images. ``Labeller`` only
stores a config and calls it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from pccfast.core.checks import check_tensor
from pccfast.core.blocky import blocky_mask
from pccfast.core.config import PCCConfig
from pccfast.core.refine import refine_mask
from pccfast.core.resize import resize
from pccfast.core.seeding import SeedingCache

__all__ = ["LabelResult", "label_images", "Labeller"]


@dataclass
class LabelResult:
    """Labels of a batch of images (``ignore_index``, 255 by default, marks uncertain pixels).

    Attributes:
        mask: (B, H, W) uint8 refined labels (the upsampled blocky mask if refinement is off).
        blocky: (B, h, w) uint8 blocky labels on the feature grid (None unless requested).
        blocky_full: (B, H, W) uint8 nearest upsampling of ``blocky`` (None unless requested).
    """

    mask: Tensor
    blocky: Optional[Tensor] = None
    blocky_full: Optional[Tensor] = None


def _check_inputs(features: Tensor, class_attention: Tensor, images: Tensor, cfg: PCCConfig) -> None:
    check_tensor(features, "features", 4, floating=True)
    b, _, h, w = features.shape
    check_tensor(class_attention, "class_attention", 4, floating=True, batch=b)
    check_tensor(images, "images", 4, batch=b)
    k = class_attention.shape[1]
    if not 1 <= k <= min(cfg.ignore_index, 255):
        raise ValueError(
            f"`class_attention` has to hold 1 to {min(cfg.ignore_index, 255)} classes (dimension 1) "
            f"but holds {k}"
        )
    if class_attention.shape[-2:] != (h, w):
        raise ValueError(
            f"`class_attention` has to have the grid of `features` {(h, w)} but has shape "
            f"{tuple(class_attention.shape)}"
        )
    if h < 1 or w < 1 or features.shape[1] < 1:
        raise ValueError(f"`features` has to be non-empty (B, D, h, w) but has shape {tuple(features.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"`images` has to have 3 channels (dimension 1) but has shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height < h or width < w or height % h or width % w:
        raise ValueError(
            f"`images` height and width have to be multiples of the feature grid {(h, w)} but are "
            f"{height} and {width}"
        )
    devices = {features.device, class_attention.device, images.device}
    if len(devices) > 1:
        raise ValueError(
            f"`features`, `class_attention` and `images` have to be on one device but are on "
            f"{features.device}, {class_attention.device} and {images.device}"
        )
    _check_values(features, class_attention, images)
    if not images.is_floating_point() and images.dtype != torch.uint8:
        raise TypeError(f"`images` has to be uint8 or floating point but has dtype {images.dtype}")


def _check_values(features: Tensor, class_attention: Tensor, images: Tensor) -> None:
    """Finite features and class maps, float images finite and in [0, 255], in one host sync.

    One summing pass per tensor (a NaN or inf makes the sum non-finite) and the images' range
    go to the host together; only a failing flag calls ``check_tensor`` for its message (which
    looks element by element, so a finite sum that overflowed passes there as before).
    """
    named = [(features, "features"), (class_attention, "class_attention")]
    if images.is_floating_point():
        named.append((images, "images"))
    named = [(x, name) for x, name in named if x.numel()]
    stats = [torch.isfinite(x.sum()).double() for x, _ in named]  # (1,) flags as 0/1
    if images.is_floating_point() and images.numel():
        stats += [images.min().double(), images.max().double()]
    if not stats:
        return
    # the one sync; an explicit copy to the host, which a dispatch counter sees on the CPU too
    got = torch.stack(stats).to("cpu", copy=True).tolist()
    for (x, name), ok in zip(named, got):
        if not ok:
            check_tensor(x, name, finite=True)
    if images.is_floating_point() and images.numel():
        lo, hi = got[-2], got[-1]
        if lo < 0.0 or hi > 255.0:
            raise ValueError(f"`images` has to lie in [0, 255] but spans [{lo:g}, {hi:g}]")


def label_images(
    features: Tensor,
    class_attention: Tensor,
    images: Tensor,
    cfg: Optional[PCCConfig] = None,
    *,
    return_blocky: bool = True,
    generator: Optional[torch.Generator] = None,
    cache: Optional[SeedingCache] = None,
) -> LabelResult:
    """Label a batch of generated images from their attention (reference sections 2 and 3).

    Args:
        features: (B, D, h, w) head-wise PCA features (not normalised).
        class_attention: (B, K, h, w) class maps, class 0 = background; all-zero = absent.
        images: (B, 3, H, W) uint8 or float in [0, 255]; H, W multiples of h, w.
        cfg: constants (reference defaults when None); ``cfg.refine`` switches section 3.
        return_blocky: also return the blocky mask and its upsampling.
        generator: k-means++ generator for all clusterings (default: fresh ones seeded
            ``cfg.kmeans_seed`` per clustering, as the reference).
        cache: optional ``SeedingCache`` that keeps the k-means++ random numbers between
            calls: a run labelling many batches with one seed holds one and passes it to
            every call (the refinement's k-means of a 512x512 batch then costs about a
            third). None keeps nothing. Results are the same either way.

    Returns:
        ``LabelResult`` with ``mask`` (B, H, W) uint8 and, if asked, ``blocky`` (B, h, w) and
        ``blocky_full`` (B, H, W) uint8.
    """
    cfg = cfg or PCCConfig()
    _check_inputs(features, class_attention, images, cfg)
    blocky = blocky_mask(features, class_attention, cfg, generator, cache)  # (B, h, w)
    blocky_full = resize(blocky, tuple(images.shape[-2:]), mode="nearest")  # (B, H, W)
    mask = refine_mask(images, blocky_full, cfg, generator, cache) if cfg.refine else blocky_full.clone()
    if not return_blocky:
        return LabelResult(mask=mask)
    return LabelResult(mask=mask, blocky=blocky, blocky_full=blocky_full)


class Labeller:
    """Stores a ``PCCConfig`` and calls ``label_images`` with it."""

    def __init__(self, cfg: Optional[PCCConfig] = None) -> None:
        self.cfg = cfg or PCCConfig()

    def __call__(self, features: Tensor, class_attention: Tensor, images: Tensor, *,
                 return_blocky: bool = True, generator: Optional[torch.Generator] = None) -> LabelResult:
        return label_images(features, class_attention, images, self.cfg, return_blocky=return_blocky,
                            generator=generator)

    def __repr__(self) -> str:
        return f"Labeller({self.cfg!r})"
