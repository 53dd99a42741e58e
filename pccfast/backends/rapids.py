"""Optional RAPIDS backends: cuML k-means (``"cuml"``) and CuPy connected components (``"cupy"``).

Neither library is a dependency. Each function checks with ``importlib.util.find_spec`` and
imports inside the function, raising ``ImportError`` that says what to install.

On a GPU the data stays on the device: tensors go to the library and results come back
through DLPack (``cupy.from_dlpack`` / ``torch.from_dlpack``), with no host copy; cuML is
asked for CuPy output. Neither library fits a batch in one call (cuML has no batch dimension,
``cupyx.scipy.ndimage.label`` labels one binary image), so they run once per image (and per
label value), but nothing is copied to the host. CuPy's piece numbering is renumbered to the
torch path's (consecutive 1..N in raster order of each piece's first pixel), so all backends
give the same ids.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

__all__ = ["kmeans_cuml", "components_cupy", "raster_order"]


def _require(module: str, what: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs {install}")


def _to_library(x: Tensor, cupy):
    """A tensor as a CuPy array: shared through DLPack on CUDA, a host array otherwise."""
    return cupy.from_dlpack(x.contiguous()) if x.is_cuda else cupy.asarray(x.contiguous().cpu().numpy())


def _to_torch(a, device: torch.device) -> Tensor:
    """A CuPy (or NumPy) array as a tensor on ``device``, through DLPack where it can be shared."""
    return torch.from_dlpack(a).to(device)


def kmeans_cuml(x: Tensor, k: int, max_iter: int, tol: float, seed: int, n_init: int) -> tuple[Tensor, Tensor]:
    """One cuML KMeans (k-means++ init) per batch item (its ``tol`` is cuML's own criterion).

    x: (B, N, D) float -> labels (B, N) long, centers (B, k, D) float32, on x's device
    """
    _require("cuml", "kmeans backend 'cuml'",
             "RAPIDS cuML, which is not installed: pip install cuml-cu12 "
             "(CUDA 12; see https://docs.rapids.ai/install), or use backend='torch'")
    import cupy  # cuML depends on CuPy
    from cuml.cluster import KMeans as CuKMeans  # noqa: WPS433 (optional backend)

    b, n, _ = x.shape
    labels = torch.empty(b, n, dtype=torch.long, device=x.device)  # (B, N)
    centers = torch.empty(b, k, x.shape[2], dtype=torch.float32, device=x.device)  # (B, k, D)
    for i, item in enumerate(x.float()):  # (N, D) per item; cuML has no batch dimension
        model = CuKMeans(n_clusters=k, max_iter=max_iter, tol=tol, random_state=seed, n_init=n_init,
                         init="k-means++", output_type="cupy")
        model.fit(_to_library(item, cupy))
        labels[i] = _to_torch(model.labels_, x.device).long()
        centers[i] = _to_torch(model.cluster_centers_, x.device).float()
    return labels, centers


def raster_order(pieces: Tensor) -> Tensor:
    """Renumber piece ids to 1..N in raster order of each piece's first pixel (per image); 0
    (no piece) stays 0.

    pieces: (B, H, W) long, ids in 0..H*W in any numbering -> (B, H, W) long. No host synchronisation.
    """
    b = pieces.shape[0]
    flat = pieces.reshape(b, -1)  # (B, P)
    p = flat.shape[1]
    pos = torch.arange(p, device=pieces.device).expand(b, p)
    first = torch.full((b, p + 1), p, dtype=torch.long, device=pieces.device)  # (B, P+1), P = absent
    first = first.scatter_reduce(1, flat, pos, reduce="amin")  # first raster position of each id
    first[:, 0] = p  # 0 is no piece: never ranked among the pieces
    order = torch.argsort(first, dim=1, stable=True)  # ids by first pixel, absent ones last
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(1, p + 2, device=pieces.device).expand(b, p + 1))
    return torch.where(flat == 0, 0, rank.gather(1, flat)).reshape(pieces.shape)


def components_cupy(labels: Tensor, connectivity: int) -> Tensor:
    """``cupyx.scipy.ndimage.label`` per image and label value, renumbered as the torch path.

    labels: (B, H, W) long -> (B, H, W) long piece ids (1..N per image in raster order of the
    first pixel), on labels' device; negative labels (masked) get 0.
    """
    _require("cupy", "components backend 'cupy'",
             "CuPy, which is not installed: pip install cupy-cuda12x (CUDA 12), or use backend='torch'")
    import cupy  # noqa: WPS433 (optional backend)
    from cupyx.scipy import ndimage as cnd

    structure = cupy.ones((3, 3), dtype=bool) if connectivity == 8 else None
    out = torch.zeros(labels.shape, dtype=torch.long, device=labels.device)  # (B, H, W)
    for i, item in enumerate(labels):  # (H, W)
        arr = _to_library(item, cupy)
        acc = cupy.zeros(arr.shape, dtype=cupy.int64)
        offset = 0
        for value in cupy.unique(arr[arr >= 0]).tolist():  # the label values of this image
            lab, num = cnd.label(arr == value, structure=structure)
            acc = cupy.where(lab > 0, lab + offset, acc)
            offset += int(num)
        out[i] = _to_torch(acc, labels.device)
    return raster_order(out)  # masked pixels are 0 in ``acc`` and stay 0
