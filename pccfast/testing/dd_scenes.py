"""Planted inputs of the Dataset Diffusion labeller, drawn from a synthetic scene's layout.

:func:`dd_inputs` turns a :class:`~pccfast.testing.synthetic.SyntheticScene` (its planted
objects and ground truth) into what ``core.dd.dd_masks`` reads:

- ``affinity`` (N2, N2), N2 = h2 * w2 at the half grid: a row-stochastic matrix whose rows put
  their weight on nearby cells of the same planted region (a Gaussian of the cell distance,
  times ``leak`` across regions), with multiplicative noise: what averaged self-attention
  probabilities look like;
- ``class_maps`` (K, h4, w4) at the quarter grid: each present class's ground-truth share of
  every cell, times a random gain, plus non-negative noise and some spill onto the other
  objects; zero maps for absent classes, and a background map (which the rule ignores);
- ``present`` (K,) bool: the scene's classes.

All randomness comes from a local generator seeded by ``seed``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pccfast.core.dd import DDConfig
from pccfast.core.resize import resize
from pccfast.testing.synthetic import SyntheticScene

__all__ = ["DDInputs", "dd_inputs", "coverage_precision"]


@dataclass
class DDInputs:
    affinity: torch.Tensor  # (N2, N2) float32, rows sum to 1
    class_maps: torch.Tensor  # (K, h4, w4) float32, >= 0
    present: torch.Tensor  # (K,) bool


def dd_inputs(scene: SyntheticScene, cfg: DDConfig | None = None, *, seed: int = 0, width: float = 0.1,
              leak: float = 0.02, affinity_noise: float = 0.3, map_noise: float = 0.15,
              spill: float = 0.3, num_classes: int | None = None) -> DDInputs:
    """Planted DD inputs of ``scene`` (see the module docstring).

    Args:
        scene: a synthetic scene; its labelling grid is ``scene.grid``.
        cfg: gives the half and quarter grids.
        width: std of the affinity's Gaussian, as a share of the half grid's side.
        leak: weight factor between cells of different regions.
        affinity_noise: std of the log-normal noise on the affinity's weights.
        map_noise: std of the (absolute Gaussian) noise on the class maps.
        spill: largest share of a class map that spills onto another object.
        num_classes: K (default: the scene's class-map rows).
    """
    cfg = cfg or DDConfig()
    g = torch.Generator().manual_seed(int(seed))
    (h2, w2), (h4, w4) = cfg.grids((scene.grid, scene.grid))
    k = num_classes or scene.class_attention.shape[0]
    objects = resize(scene.objects[None].float(), (h2, w2), mode="nearest")[0].long().flatten()  # (N2,)
    ys, xs = torch.meshgrid(torch.arange(h2, dtype=torch.float32) / h2, torch.arange(w2, dtype=torch.float32) / w2,
                            indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1)  # (N2, 2)
    d2 = torch.cdist(pos, pos).square()  # (N2, N2)
    same = objects[:, None] == objects[None, :]  # (N2, N2)
    weight = torch.exp(-d2 / (2 * width ** 2)) * torch.where(same, 1.0, leak)
    weight = weight * torch.exp(affinity_noise * torch.randn(weight.shape, generator=g))
    affinity = weight / weight.sum(dim=1, keepdim=True)  # (N2, N2), row-stochastic

    gt = scene.gt.long()  # (H, W)
    onehot = F.one_hot(gt, k).permute(2, 0, 1).float()  # (K, H, W)
    share = F.adaptive_avg_pool2d(onehot[None], (h4, w4))[0]  # (K, h4, w4)
    present = torch.zeros(k, dtype=torch.bool)
    present[list(scene.classes)] = True
    maps = torch.zeros(k, h4, w4)
    fg = share[1:].sum(0)  # (h4, w4) any object
    for c in scene.classes:
        gain = 0.6 + 0.8 * float(torch.rand((), generator=g))
        other = (fg - share[c]).clamp_min(0)
        maps[c] = gain * share[c] + spill * float(torch.rand((), generator=g)) * other
    maps[0] = share[0]
    maps[present] += map_noise * torch.randn(int(present.sum()), h4, w4, generator=g).abs()
    return DDInputs(affinity.float(), maps.float(), present)


def coverage_precision(mask: torch.Tensor, gt: torch.Tensor, ignore_index: int = 255) -> tuple[float, float]:
    """(coverage, precision) of a mask against the ground truth: the share of pixels labelled
    (not ``ignore_index``), and the share of labelled pixels whose label is the true one."""
    mask, gt = torch.as_tensor(mask).long(), torch.as_tensor(gt).long()
    if mask.shape != gt.shape:
        raise ValueError(f"`mask` and `gt` have to have one shape but have {tuple(mask.shape)} and {tuple(gt.shape)}")
    labelled = mask != ignore_index
    n = int(labelled.sum())
    if n == 0:
        return 0.0, 1.0
    return n / mask.numel(), float((mask[labelled] == gt[labelled]).double().mean())
