"""Feature assembly for clustering (reference section 2, first step).

Each of the D feature columns is min-max normalised over the image's pixels, then the
pixels' x (column) and y (row) coordinates, each min-max normalised to [0, 1], are appended.
``clustering_points`` does both and the k-means centring in one go (on the CPU in the C kernel
``kernels/features.c`` when it builds: ``pccfast.backends.OPERATIONS["features"]``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pccfast.backends import kernels, resolve
from pccfast.core.checks import check_tensor
from pccfast.core.kmeans import PreparedPoints

__all__ = ["minmax_columns", "pixel_coordinates", "assemble_features", "clustering_points"]


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


def clustering_points(features: Tensor, transpose: bool = False) -> PreparedPoints:
    """``kmeans.prepare_points(assemble_features(features))`` in three passes over the features.

    The k-means of section 2 centres its points; the centred normalised column d is
    ``f_d * inv_d - mean(f_d) * inv_d`` with ``inv_d = 1 / (max - min)`` (0 for a constant
    column), so min/max, mean/variance and one multiply-add give it directly, written into
    the (B, N, D + 2) layout the k-means takes (values equal ``assemble_features`` then
    centring up to float rounding).

    Args:
        features: (B, D, h, w) head-wise PCA features, float.
        transpose: also return the centred points transposed and their squared norms (the
            torch k-means backend needs both).

    Returns:
        ``PreparedPoints`` (what ``kmeans(prepared=)`` takes): centred points ``x`` (B, h*w, D+2)
        float32, their column means ``mean`` (B, 1, D+2), the transpose ``xt`` (B, D+2, h*w)
        contiguous or None, squared norms ``x_sq`` (B, h*w) or None, mean feature variance
        ``var`` (B,) (scikit-learn's tolerance scale). Without ``transpose``, CPU tensors go
        through the C kernel ``kernels/features.c`` (statistics in double, the transpose in
        cache-sized tiles) when it builds.
    """
    check_tensor(features, "features", 4, floating=True)
    b, d, h, w = features.shape
    n = h * w
    if resolve("features", "auto", features, fits=not transpose and b * h * w > 0) == "native":
        out, mean, var = kernels.clustering_points(features)  # (B, N, D+2), (B, D+2), (B,) float64
        return PreparedPoints(out, mean[:, None, :], None, None, var.float())
    f = features.float().reshape(b, d, n)  # (B, D, N), pixels contiguous
    lo, hi = torch.aminmax(f, dim=-1)  # (B, D) each
    span = hi - lo
    inv = torch.where(span > 0, 1.0 / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
    var_f, mean_f = torch.var_mean(f, dim=-1, correction=0)  # (B, D) each
    xy = pixel_coordinates(h, w, device=features.device)  # (N, 2) in [0, 1]
    xy_mean = xy.mean(0)  # (2,)
    out = torch.empty(b, n, d + 2, device=features.device, dtype=torch.float32)  # (B, N, D+2)
    cols = out[..., :d].transpose(1, 2)  # (B, D, N) strided view into out
    torch.addcmul((-mean_f * inv)[..., None], f, inv[..., None], out=cols)  # centred normalised columns
    out[..., d:] = xy - xy_mean  # centred coordinates, the same for every image
    mean = torch.cat([(mean_f - lo) * inv, xy_mean.expand(b, 2)], dim=-1)[:, None, :]  # (B, 1, D+2)
    var = ((var_f * inv * inv).sum(-1) + ((xy - xy_mean) ** 2).mean(0).sum()) / (d + 2)  # (B,)
    if not transpose:
        return PreparedPoints(out, mean, None, None, var)
    return PreparedPoints(out, mean, out.transpose(1, 2).contiguous(), (out * out).sum(-1), var)

