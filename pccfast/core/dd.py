"""Dataset Diffusion's labeller (Nguyen et al., NeurIPS 2023) and the fused PCC + DD labeller.

Dataset Diffusion labels an image from two quantities captured during sampling:

* the *affinity* A (B, N2, N2), N2 = h2 * w2: the self-attention probabilities of every
  self-attention layer at the "half" grid (the labelling grid / ``affinity_scale``: 32x32 for
  SD at 512x512), conditional CFG half, averaged over heads, layers and steps;
* the *class maps* (B, K, h4, w4) at the "quarter" grid (grid / ``class_scale``: 16x16):
  cross-attention probabilities of a separate class prompt, averaged over heads, layers and
  steps, one map per class of the label set.

The rule, per image and per class of the image's prompt (``present``): the class map is
resized bicubically (align_corners=False) to the half grid, propagated ``A^power @ map``,
min-max normalised to [0, 1] over the half grid, resized bicubically to the image size; each
pixel takes the class of its highest score ``s``: ``s >= threshold`` -> the class,
``uncertain_threshold <= s < threshold`` -> ``ignore_index``, else background (0). There is
no background map, and class 0 is never a candidate.

``A^power @ map`` is computed as ``power`` products ``A @ (A @ (... @ map))`` (the same
quantity, up to float rounding, at a fraction of the cost of forming ``A^power``), for all
images and all their present classes at once: no Python loop over classes or images. The
propagation and the min-max scaling run in float64 (a few hundred kFLOP per class and image):
where attention is nearly uniform, ``A^power @ map`` varies by a tiny fraction of its value
and min-max scaling would turn float32 rounding (which differs with the batch size) into
different masks.

``fuse_masks`` is the fused labeller: a pixel keeps its label where PCC's refined mask and
DD's mask agree and becomes ``ignore_index`` where they disagree (or either is uncertain).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from pccfast.core.checks import check_pair, check_tensor
from pccfast.core.config import PCCConfig
from pccfast.core.labelset import LabelSet
from pccfast.core.resize import resize

__all__ = ["DDConfig", "propagate", "dd_scores", "dd_masks", "fuse_masks", "LABELERS", "LabelerChoice",
           "LabelerOutput", "present_classes", "run_labeler"]

LABELERS = ("pcc", "dd", "fused")  # the labellers a run can choose (``--labeler``)


@dataclass
class DDConfig:
    """Constants of Dataset Diffusion's labeller (defaults = its paper and code)."""

    affinity_scale: int = 2  # self-attention layers at the labelling grid / this ("half": 32x32 for SD at 512)
    class_scale: int = 4  # cross-attention layers at the labelling grid / this ("quarter": 16x16 for SD at 512)
    power: int = 4  # class maps are propagated A^power @ map
    threshold: float = 0.6  # a pixel whose best normalised score is at least this takes that class
    uncertain_threshold: float = 0.5  # scores in [this, threshold) are uncertain (ignore_index); below: background
    step_start: float = 0.0  # steps window: denoising call i of n counts when step_start * n <= i < step_end * n
    step_end: float = 1.0  # (0, 1): every call, as Dataset Diffusion
    ignore_index: int = 255  # label of uncertain pixels

    def __post_init__(self) -> None:
        for name in ("affinity_scale", "class_scale", "power"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` has to be a positive int but is {value!r}")
        for name in ("affinity_scale", "class_scale"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"`{name}` has to be a power of 2 (a UNet level) but is {value}")
        if self.class_scale < self.affinity_scale:
            raise ValueError(f"`class_scale` has to be at least `affinity_scale` ({self.affinity_scale}): the class "
                             f"maps are upsampled to the affinity's grid, but it is {self.class_scale}")
        if not 0.0 < self.uncertain_threshold <= self.threshold <= 1.0:
            raise ValueError(f"`uncertain_threshold` and `threshold` have to satisfy 0 < uncertain_threshold <= "
                             f"threshold <= 1 but are {self.uncertain_threshold:g} and {self.threshold:g}")
        if not 0.0 <= self.step_start < self.step_end <= 1.0:
            raise ValueError(f"`step_start` and `step_end` have to satisfy 0 <= step_start < step_end <= 1 but are "
                             f"{self.step_start:g} and {self.step_end:g}")
        if not 0 <= self.ignore_index <= 255:
            raise ValueError(f"`ignore_index` has to lie in [0, 255] but is {self.ignore_index}")

    def replace(self, **changes) -> "DDConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def step_window(self, num_calls: int) -> tuple[int, int]:
        """(first, stop): the denoising calls ``first <= i < stop`` of ``num_calls`` that count.

        Raises:
            ValueError: the window holds no call of this run.
        """
        n = operator.index(num_calls)
        first, stop = math.ceil(self.step_start * n - 1e-9), min(n, math.ceil(self.step_end * n - 1e-9))
        if stop <= first:
            raise ValueError(f"`step_start` {self.step_start:g} and `step_end` {self.step_end:g} hold none of the "
                             f"{n} denoising calls of this run")
        return first, stop

    def grids(self, grid_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The half and quarter grids ((h2, w2), (h4, w4)) of a labelling grid (h, w):
        ceil(h / scale), as the UNet's levels are."""
        h, w = int(grid_hw[0]), int(grid_hw[1])
        half = (math.ceil(h / self.affinity_scale), math.ceil(w / self.affinity_scale))
        quarter = (math.ceil(h / self.class_scale), math.ceil(w / self.class_scale))
        return half, quarter


def propagate(affinity: Tensor, maps: Tensor, power: int) -> Tensor:
    """``A^power @ maps``, as ``power`` batched products (A is never raised to the power).

    Args:
        affinity: (B, N, N) row-stochastic (or any) affinity.
        maps: (B, N, C) columns to propagate.
        power: number of products, >= 0.

    Returns:
        (B, N, C) in the promoted dtype of the inputs.
    """
    check_tensor(affinity, "affinity", 3, floating=True)
    check_tensor(maps, "maps", 3, floating=True, batch=affinity.shape[0])
    if affinity.shape[1] != affinity.shape[2] or maps.shape[1] != affinity.shape[1]:
        raise ValueError(f"`affinity` (B, N, N) and `maps` (B, N, C) have to agree but have shapes "
                         f"{tuple(affinity.shape)} and {tuple(maps.shape)}")
    if isinstance(power, bool) or not isinstance(power, int) or power < 0:
        raise ValueError(f"`power` has to be an int >= 0 but is {power!r}")
    dtype = torch.promote_types(affinity.dtype, maps.dtype)
    a, x = affinity.to(dtype), maps.to(dtype)
    for _ in range(power):  # a fixed count, no data-dependent control flow
        x = torch.bmm(a, x)  # (B, N, C)
    return x


def _check(affinity: Tensor, class_maps: Tensor, cfg: DDConfig, affinity_hw) -> tuple[int, int]:
    check_tensor(class_maps, "class_maps", 4, floating=True, min_size=(None, 1, 1, 1))
    b, _, h4, w4 = class_maps.shape
    check_tensor(affinity, "affinity", 3, floating=True, batch=b)
    if affinity_hw is None:
        f = cfg.class_scale // cfg.affinity_scale
        affinity_hw = (h4 * f, w4 * f)
    h2, w2 = check_pair(affinity_hw, "affinity_hw")
    if tuple(affinity.shape[1:]) != (h2 * w2, h2 * w2):
        raise ValueError(f"`affinity` has to be (B, N2, N2) with N2 = {h2}*{w2} = {h2 * w2} (the half grid of "
                         f"`class_maps` {h4}x{w4}) but has shape {tuple(affinity.shape)}")
    if affinity.device != class_maps.device:
        raise ValueError(f"`affinity` and `class_maps` have to be on one device but are on {affinity.device} and "
                         f"{class_maps.device}")
    return h2, w2


def dd_scores(affinity: Tensor, class_maps: Tensor, cfg: DDConfig | None = None, *, affinity_hw=None) -> Tensor:
    """Every class's normalised propagated score on the half grid (the rule before its thresholds).

    Args:
        affinity: (B, N2, N2) float, N2 = h2 * w2.
        class_maps: (B, C, h4, w4) float, the maps to score (any subset of the classes).
        cfg: constants (``class_scale // affinity_scale`` gives the half grid when
            ``affinity_hw`` is None).
        affinity_hw: (h2, w2) of the affinity's grid, if not the class grid times that factor.

    Returns:
        (B, C, h2, w2) float32 in [0, 1]: bicubic to (h2, w2), ``A^power @ map``, min-max per
        image and class (a constant map gives zeros); computed in float64.
    """
    cfg = cfg or DDConfig()
    h2, w2 = _check(affinity, class_maps, cfg, affinity_hw)
    b, c = class_maps.shape[:2]
    up = resize(class_maps.double(), (h2, w2), mode="bicubic")  # (B, C, h2, w2)
    x = propagate(affinity.double(), up.reshape(b, c, h2 * w2).transpose(1, 2), cfg.power)  # (B, N2, C)
    lo = x.amin(dim=1, keepdim=True)  # (B, 1, C)
    span = x.amax(dim=1, keepdim=True) - lo  # (B, 1, C)
    x = (x - lo) / torch.where(span > 0, span, torch.ones_like(span))  # (B, N2, C), zeros where constant
    return x.float().transpose(1, 2).reshape(b, c, h2, w2)  # (B, C, h2, w2)


def dd_masks(
    affinity: Tensor,
    class_maps: Tensor,
    present: Tensor,
    image_hw,
    cfg: DDConfig | None = None,
    *,
    affinity_hw=None,
) -> Tensor:
    """Dataset Diffusion's masks of a batch of images.

    Args:
        affinity: (B, N2, N2) float: averaged self-attention probabilities at the half grid.
        class_maps: (B, K, h4, w4) float: class maps of the label set at the quarter grid.
        present: (B, K) bool: the classes of each image's prompt (class 0, background, is
            never a candidate whatever its entry).
        image_hw: (H, W) of the masks.
        cfg: constants (Dataset Diffusion's when None).
        affinity_hw: (h2, w2), if not ``class_maps``' grid times ``class_scale // affinity_scale``.

    Returns:
        (B, H, W) uint8: the class index, ``cfg.ignore_index`` for uncertain pixels, 0 for
        background. Ties between classes go to the lower class index.

    One host read per call (the most classes any image holds, which sizes the image-size
    score tensor, together with the inputs' finiteness flags).
    """
    cfg = cfg or DDConfig()
    h2, w2 = _check(affinity, class_maps, cfg, affinity_hw)
    big_h, big_w = check_pair(image_hw, "image_hw")
    b, k = class_maps.shape[:2]
    check_tensor(present, "present", 2, batch=b)
    if present.dtype != torch.bool:
        raise TypeError(f"`present` has to be a bool tensor but has dtype {present.dtype}")
    if present.shape[1] != k:
        raise ValueError(f"`present` has to be (B, K) = ({b}, {k}) like `class_maps` but has shape "
                         f"{tuple(present.shape)}")
    present = present.to(class_maps.device).clone()
    present[:, 0] = False  # no background map
    flags = torch.stack([present.sum(dim=1).max().double() if b else torch.zeros((), dtype=torch.float64,
                                                                                   device=present.device),
                         torch.isfinite(affinity.sum()).double(), torch.isfinite(class_maps.sum()).double()])
    kp, ok_a, ok_m = flags.to("cpu", copy=True).tolist()  # the one host read
    if not ok_a:
        check_tensor(affinity, "affinity", finite=True)
    if not ok_m:
        check_tensor(class_maps, "class_maps", finite=True)
    kp = int(kp)
    out = torch.zeros(b, big_h, big_w, dtype=torch.uint8, device=class_maps.device)  # (B, H, W)
    if kp == 0:
        return out
    order = torch.sort(present.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :kp]  # (B, kp)
    valid = present.gather(1, order)  # (B, kp): slot j holds a present class
    picked = class_maps.gather(1, order[:, :, None, None].expand(b, kp, *class_maps.shape[-2:]))  # (B, kp, h4, w4)
    scores = dd_scores(affinity, picked, cfg, affinity_hw=(h2, w2))  # (B, kp, h2, w2)
    full = resize(scores, (big_h, big_w), mode="bicubic")  # (B, kp, H, W)
    full = full.masked_fill(~valid[:, :, None, None], float("-inf"))
    slot = full.argmax(dim=1, keepdim=True)  # (B, 1, H, W): the first of tied maxima
    best = full.gather(1, slot)[:, 0]  # (B, H, W)
    label = order.gather(1, slot.reshape(b, -1)).reshape(b, big_h, big_w)  # (B, H, W) class index
    out = torch.where(best >= cfg.threshold, label.to(torch.uint8), out)
    uncertain = (best >= cfg.uncertain_threshold) & (best < cfg.threshold)
    return out.masked_fill(uncertain, cfg.ignore_index)


def fuse_masks(pcc: Tensor, dd: Tensor, ignore_index: int = 255) -> Tensor:
    """The fused labeller: keep a pixel's label where both masks agree, else ``ignore_index``.

    Args:
        pcc: (*, H, W) integer labels (PCC's refined mask).
        dd: (*, H, W) integer labels (Dataset Diffusion's mask), same shape.
        ignore_index: the uncertain label (uncertain in either mask stays uncertain).

    Returns:
        (*, H, W) in ``pcc``'s dtype.
    """
    check_tensor(pcc, "pcc", integer=True, min_size=None)
    check_tensor(dd, "dd", integer=True)
    if pcc.shape != dd.shape:
        raise ValueError(f"`pcc` and `dd` have to have one shape but have {tuple(pcc.shape)} and {tuple(dd.shape)}")
    if pcc.ndim < 2:
        raise ValueError(f"`pcc` has to have at least 2 dimensions (*, H, W) but has shape {tuple(pcc.shape)}")
    if not 0 <= ignore_index <= 255:
        raise ValueError(f"`ignore_index` has to lie in [0, 255] but is {ignore_index}")
    return torch.where(pcc == dd.to(pcc.dtype), pcc, torch.full_like(pcc, ignore_index))


@dataclass(frozen=True)
class LabelerChoice:
    """Which labeller makes a run's masks, and what else it keeps.

    ``labeler``: "pcc" (PCC's refined mask), "dd" (Dataset Diffusion's) or "fused"
    (``fuse_masks`` of both); ``dd``: Dataset Diffusion's constants; ``save_all``: also keep
    both labellers' own masks (``SegmentationClassPCC/``, ``SegmentationClassDD/``).
    """

    labeler: str = "pcc"
    dd: DDConfig = field(default_factory=DDConfig)
    save_all: bool = False

    def __post_init__(self) -> None:
        if self.labeler not in LABELERS:
            raise ValueError(f"`labeler` has to be one of {', '.join(LABELERS)} but is {self.labeler!r}")
        if not isinstance(self.dd, DDConfig):
            raise TypeError(f"`dd` has to be a DDConfig but is {type(self.dd).__name__}")

    @property
    def needs_dd(self) -> bool:
        """Dataset Diffusion's tensors are needed (captured, saved, read)."""
        return self.labeler != "pcc" or self.save_all

    @property
    def needs_pcc(self) -> bool:
        """PCC's labeller runs."""
        return self.labeler != "dd" or self.save_all


@dataclass
class LabelerOutput:
    """Masks of a batch: ``mask`` (B, H, W) uint8 is the chosen labeller's; ``pcc`` and ``dd``
    (B, H, W) uint8 each labeller's own (None when it did not run); ``blocky_full`` PCC's
    upsampled blocky mask (None unless asked for and PCC ran)."""

    mask: Tensor
    pcc: Optional[Tensor] = None
    dd: Optional[Tensor] = None
    blocky_full: Optional[Tensor] = None


def present_classes(class_names: list, label_set: LabelSet, device="cpu") -> Tensor:
    """(B, K) bool: per image, the label-set classes of its prompt (``class_names[i]``)."""
    rows = [[label_set.index(c) for c in names] for names in class_names]
    flat = torch.tensor([k for row in rows for k in row], dtype=torch.long)
    which = torch.tensor([i for i, row in enumerate(rows) for _ in row], dtype=torch.long)
    out = torch.zeros(len(rows), label_set.num_classes, dtype=torch.bool)
    out[which, flat] = True
    return out.to(device)


def run_labeler(
    choice: LabelerChoice,
    images: Tensor,
    present: Tensor,
    *,
    features: Optional[Tensor] = None,
    class_attention: Optional[Tensor] = None,
    dd_affinity: Optional[Tensor] = None,
    dd_class_attention: Optional[Tensor] = None,
    cfg: Optional[PCCConfig] = None,
    return_blocky: bool = False,
    generator: Optional[torch.Generator] = None,
    cache=None,
) -> LabelerOutput:
    """The chosen labeller (and, with ``choice.save_all``, both) on one batch.

    Args:
        choice: the labeller and its constants.
        images: (B, 3, H, W) uint8 or float in [0, 255].
        present: (B, K) bool, the classes of each image's prompt (Dataset Diffusion's candidates).
        features, class_attention: PCC's inputs (B, D, h, w), (B, K, h, w) (when PCC runs).
        dd_affinity, dd_class_attention: Dataset Diffusion's (B, N2, N2), (B, K, h4, w4) (when it runs).
        cfg: PCC's constants; its ``ignore_index`` is also DD's and the fused mask's.
        return_blocky: also return PCC's upsampled blocky mask.
        generator, cache: PCC's k-means++ generator and seeding cache (``label_images``).
    """
    from pccfast.core.labeller import label_images

    cfg = cfg or PCCConfig()
    pcc = dd = blocky = None
    if choice.needs_pcc:
        if features is None or class_attention is None:
            raise ValueError(f"the {choice.labeler!r} labeller needs `features` and `class_attention` (PCC's inputs)")
        more = {} if generator is None else {"generator": generator}
        res = label_images(features, class_attention, images, cfg, return_blocky=return_blocky, cache=cache, **more)
        pcc, blocky = res.mask, res.blocky_full
    if choice.needs_dd:
        if dd_affinity is None or dd_class_attention is None:
            raise ValueError(f"the {choice.labeler!r} labeller needs `dd_affinity` and `dd_class_attention` "
                             "(Dataset Diffusion's inputs)")
        dcfg = choice.dd if choice.dd.ignore_index == cfg.ignore_index else choice.dd.replace(ignore_index=cfg.ignore_index)
        dd = dd_masks(dd_affinity, dd_class_attention, present, tuple(images.shape[-2:]), dcfg)
    mask = {"pcc": pcc, "dd": dd}.get(choice.labeler)
    if choice.labeler == "fused":
        mask = fuse_masks(pcc, dd, cfg.ignore_index)
    return LabelerOutput(mask=mask, pcc=pcc if choice.save_all else None, dd=dd if choice.save_all else None,
                         blocky_full=blocky)
