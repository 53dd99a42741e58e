"""Optional RAPIDS backends: cuML k-means (``"cuml"``) and CuPy connected components (``"cupy"``).

Neither library is a dependency. Each function checks with ``importlib.util.find_spec`` and
imports inside the function, raising ``ImportError`` that says what to install.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

__all__ = ["kmeans_cuml", "components_cupy"]


def _require(module: str, what: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs {install}")


def kmeans_cuml(x: Tensor, k: int, max_iter: int, tol: float, seed: int, n_init: int) -> tuple[Tensor, Tensor]:
    """One cuML KMeans (k-means++ init) per batch item (its ``tol`` is cuML's own criterion).

    x: (B, N, D) float -> labels (B, N) long, centers (B, k, D) float32, on x's device
    """
    _require("cuml", "kmeans backend 'cuml'",
             "RAPIDS cuML, which is not installed: pip install cuml-cu12 "
             "(CUDA 12; see https://docs.rapids.ai/install), or use backend='torch'")
    from cuml.cluster import KMeans as CuKMeans  # noqa: WPS433 (optional backend)

    labels, centers = [], []
    for item in x.float().contiguous():  # (N, D) per item; cuML has no batch dimension
        if item.is_cuda:
            import cupy  # cuML depends on CuPy

            data = cupy.from_dlpack(item)
        else:
            data = item.numpy()
        model = CuKMeans(
            n_clusters=k, max_iter=max_iter, tol=tol, random_state=seed, n_init=n_init,
            init="k-means++", output_type="numpy",
        )
        model.fit(data)
        labels.append(torch.as_tensor(model.labels_, dtype=torch.long))
        centers.append(torch.as_tensor(model.cluster_centers_, dtype=torch.float32))
    return torch.stack(labels).to(x.device), torch.stack(centers).to(x.device)


def components_cupy(labels: Tensor, connectivity: int) -> Tensor:
    """One ``cupyx.scipy.ndimage.label`` call per image and label value.

    labels: (B, H, W) long -> (B, H, W) long piece ids (1..N per image), on labels' device
    """
    _require("cupy", "components backend 'cupy'",
             "CuPy, which is not installed: pip install cupy-cuda12x (CUDA 12), or use backend='torch'")
    import cupy  # noqa: WPS433 (optional backend)
    from cupyx.scipy import ndimage as cnd

    structure = cupy.ones((3, 3), dtype=bool) if connectivity == 8 else None
    outs = []
    for item in labels:  # (H, W)
        arr = cupy.from_dlpack(item.contiguous()) if item.is_cuda else cupy.asarray(item.cpu().numpy())
        out = cupy.zeros(arr.shape, dtype=cupy.int64)
        offset = 0
        for value in cupy.unique(arr[arr >= 0]).tolist():
            lab, num = cnd.label(arr == value, structure=structure)
            out = cupy.where(lab > 0, lab + offset, out)
            offset += int(num)
        outs.append(torch.as_tensor(cupy.asnumpy(out)))
    return torch.stack(outs).to(labels.device)
