"""Feature assembly for clustering (reference section 2, first step).

Each of the D feature columns is min-max normalised over the image's pixels, then the
pixels' x (column) and y (row) coordinates, each min-max normalised to [0, 1], are appended.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_tensor

__all__ = ["minmax_columns", "pixel_coordinates", "assemble_features"]


def minmax_columns(x: Tensor) -> Tensor:
    """Min-max normalise every column over the points; a constant column becomes 0 (never NaN).

    x: (B, N, D) -> (B, N, D) in [0, 1]
    """
    lo = x.amin(dim=1, keepdim=True)  # (B, 1, D)
    span = x.amax(dim=1, keepdim=True) - lo  # (B, 1, D)
    safe = torch.where(span > 0, span, torch.ones_like(span))
    # a constant column has x - lo == 0 exactly, so it gives 0 / 1 = 0 without a second where
    return (x - lo) / safe


def pixel_coordinates(h: int, w: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Column and row index of every pixel (row-major), each min-max normalised to [0, 1].

    Returns (h*w, 2): (x, y); a single column or row gives 0.
    """
    ys = torch.arange(h, device=device, dtype=dtype) / max(h - 1, 1)  # (h,)
    xs = torch.arange(w, device=device, dtype=dtype) / max(w - 1, 1)  # (w,)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)  # (h*w, 2)


def assemble_features(features: Tensor) -> Tensor:
    """Clustering input of section 2.

    Args:
        features: (B, D, h, w) head-wise PCA features (any scale), float.

    Returns:
        (B, h*w, D + 2) float32: min-max normalised columns, then normalised x and y.
    """
    check_tensor(features, "features", 4, floating=True)
    b, d, h, w = features.shape
    cols = features.float().reshape(b, d, h * w).transpose(1, 2)  # (B, h*w, D), row-major pixels
    xy = pixel_coordinates(h, w, device=features.device).expand(b, -1, -1)  # (B, h*w, 2)
    return torch.cat([minmax_columns(cols), xy], dim=-1)  # (B, h*w, D+2)
