"""ctypes bindings of the C kernels (``kernels/*.c``): tensors in, tensors out.

Each function takes contiguous CPU tensors in the layout its kernel reads, calls it once with
torch's thread count, and raises on a status other than success. The loops around them (the
k-means++ draws, the choice of layout, the config) live in ``pccfast.core``; this module only
knows the C signatures. Loading and building are ``native.load`` / ``native.typed``, which
raise ``NativeUnavailable`` when a kernel cannot be built.

| function | kernel | C entry point |
|---|---|---|
| ``kernel_points`` | ``kmeans.c`` | (the layout it reads) |
| ``kmeanspp_step`` | ``kmeans.c`` | ``pcc_kmeanspp_step`` |
| ``kmeans_lloyd`` | ``kmeans.c`` | ``pcc_kmeans_lloyd`` |
| ``clustering_points`` | ``features.c`` | ``pcc_clustering_points`` |
| ``components`` | ``components.c`` | ``pcc_components`` |
| ``cleanup`` | ``morphology.c`` | ``pcc_cleanup`` |
"""
from __future__ import annotations

import ctypes
from typing import Optional
import torch
from torch import Tensor

from pccfast.backends.native import num_threads, ptr, typed

__all__ = ["NARROW_D", "MAX_COMPONENT_PIXELS", "SIGNATURES", "library", "kernel_points", "kmeanspp_step",
           "kmeans_lloyd", "clustering_points", "components", "cleanup"]

NARROW_D = 16  # kernels/kmeans.c NARROW_D: up to this width the kernel takes points transposed (B, D, N)
MAX_COMPONENT_PIXELS = 2**31 - 1  # kernels/components.c numbers runs with int32: H * W has to stay below

_vp, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32

# {kernel: {function: (argument types, result type)}}
SIGNATURES = {
    "kmeans": {
        "pcc_kmeans_lloyd": ([_vp, _i64, _i64, _i64, _i64, _vp, _vp, _vp, _vp, _i64, _i32, _i32, _vp], ctypes.c_int),
        "pcc_kmeanspp_step": ([_vp, _i64, _i64, _i64, _vp, _i64, _vp, _vp, _vp, _i32], None),
    },
    "features": {"pcc_clustering_points": ([_vp, _i64, _i64, _i64, _i64, _vp, _vp, _vp, _i32], ctypes.c_int)},
    "components": {"pcc_components": ([_vp, _i64, _i64, _i64, _i32, _vp, _i32], ctypes.c_int)},
    "morphology": {"pcc_cleanup": ([_vp, _i64, _i64, _i64, _vp, _i64, _i32, _i32, _i32, _i32, _i32, _vp, _i32],
                                   ctypes.c_int)},
}


def library(name: str) -> ctypes.CDLL:
    """The compiled ``kernels/<name>.c`` with its argument types set (raises ``NativeUnavailable``)."""
    if name not in SIGNATURES:
        raise ValueError(f"`name` has to be one of {', '.join(map(repr, SIGNATURES))} but is {name!r}")
    return typed(name, SIGNATURES[name])


def kernel_points(x: Tensor, xt: Optional[Tensor] = None) -> Tensor:
    """The layout the k-means kernel takes: x^T (B, D, N) contiguous for narrow points
    (D <= ``NARROW_D``; ``xt`` when given, else computed), else x (B, N, D) itself."""
    if x.shape[-1] > NARROW_D:
        return x
    return xt if xt is not None else x.transpose(1, 2).contiguous()


def kmeanspp_step(points: Tensor, n: int, d: int, candidates: Tensor, closest: Tensor, chosen: Tensor) -> None:
    """One greedy k-means++ step in place: the candidate of lowest potential per item, and the
    closest distances lowered with it (a first step is T = 1 with ``closest`` = +inf).

    Args:
        points: float32 (B, D, N) if ``d <= NARROW_D`` else (B, N, D), contiguous.
        n, d: points and features per item.
        candidates: (B, T, D) float32 contiguous candidate centres.
        closest: (B, N) float32, squared distance to the nearest centre so far (updated).
        chosen: (B,) int64 out, the chosen candidate (first on ties).
    """
    b, t = candidates.shape[:2]
    library("kmeans").pcc_kmeanspp_step(ptr(points), b, n, d, ptr(candidates), t, ptr(closest), ptr(chosen), None,
                                        num_threads())


def kmeans_lloyd(points: Tensor, n: int, d: int, centers: Tensor, tol_abs: Tensor, max_iter: int,
                 prune: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations with exact Hamerly (narrow) or Elkan (wide) pruning, ``centers`` updated in place.

    Args:
        points: float32 (B, D, N) if ``d <= NARROW_D`` else (B, N, D), contiguous.
        n, d: points and features per item.
        centers: (B, k, D) float32 contiguous initial centres, overwritten with the final ones.
        tol_abs: (B,) float64 absolute tolerance on the summed squared centre shift.
        max_iter: iteration cap.
        prune: use the bounds (False: every distance, for the exactness test).

    Returns:
        labels (B, N) int64, squared distance to the own centre (B, N) float32, iterations run (B,) int64.
    """
    b, k = centers.shape[:2]
    labels = torch.empty(b, n, dtype=torch.int64)
    min_dist = torch.empty(b, n, dtype=torch.float32)
    n_iter = torch.empty(b, dtype=torch.int64)
    rc = library("kmeans").pcc_kmeans_lloyd(ptr(points), b, n, d, k, ptr(centers), ptr(labels), ptr(min_dist),
                                            ptr(tol_abs), max_iter, int(prune), num_threads(), ptr(n_iter))
    if rc != 0:
        raise MemoryError(f"native k-means could not allocate its work space (B={b}, N={n}, D={d}, k={k})")
    return labels, min_dist, n_iter


def clustering_points(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Section 2's centred, min-max normalised points with x and y appended (``kernels/features.c``).

    features: (B, D, h, w) float CPU -> points (B, h*w, D+2) float32, column means (B, D+2)
    float32, mean feature variance (B,) float64
    """
    b, d, h, w = features.shape
    f = features.float().contiguous()  # (B, D, h, w)
    out = torch.empty(b, h * w, d + 2, dtype=torch.float32)  # (B, N, D+2)
    mean = torch.empty(b, d + 2, dtype=torch.float32)  # (B, D+2)
    var = torch.empty(b, dtype=torch.float64)  # (B,)
    if library("features").pcc_clustering_points(ptr(f), b, d, h, w, ptr(out), ptr(mean), ptr(var),
                                                  num_threads()) != 0:
        raise MemoryError(f"the features kernel could not allocate its work space (D={d})")
    return out, mean, var


def components(labels: Tensor, connectivity: int) -> Tensor:
    """Connected pieces by run-based union-find (``kernels/components.c``), numbered 1..N per
    image in raster order of their first pixel; 0 where labels < 0.

    labels: (B, H, W) int64 CPU -> (B, H, W) int64
    """
    labels = labels.contiguous()
    b, h, w = labels.shape
    out = torch.empty_like(labels)  # (B, H, W)
    status = library("components").pcc_components(ptr(labels), b, h, w, connectivity, ptr(out), num_threads())
    if status == 1:
        raise MemoryError(f"components kernel: out of memory for labels of shape {tuple(labels.shape)}")
    if status:
        raise ValueError(f"components kernel: labels of shape {tuple(labels.shape)} are too large (status {status})")
    return out


def cleanup(labels: Tensor, ignore_index: int, erode_first: int, dilate_iters: int, erode_after: int,
            band_dilations: int) -> Tensor:
    """The refinement's clean-up on bit-packed masks (``kernels/morphology.c``).

    Args:
        labels: (B, H, W) integer CPU.
        ignore_index: the uncertain label; then the four iteration counts of ``PCCConfig`` (>= 0).

    Returns:
        (B, H, W) uint8.
    """
    lab = labels.to(torch.int64).contiguous()  # (B, H, W)
    b, h, w = lab.shape
    out = torch.empty(b, h, w, dtype=torch.uint8)
    if out.numel() == 0:
        return out
    lib = library("morphology")
    iters = (erode_first, dilate_iters, erode_after, band_dilations)
    nt = num_threads()
    rc = lib.pcc_cleanup(ptr(lab), b, h, w, None, 0, ignore_index, *iters, ptr(out), nt)  # values found by the kernel
    if rc == 1:  # a label outside [0, 255]: pass the values present
        values = torch.unique(lab)
        values = values[values != 0].contiguous()  # (C,) ascending
        rc = lib.pcc_cleanup(ptr(lab), b, h, w, ptr(values), values.numel(), ignore_index, *iters, ptr(out), nt)
    if rc != 0:
        raise MemoryError(f"native clean-up could not allocate its work space (B={b}, H={h}, W={w})")
    return out
