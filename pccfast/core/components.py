"""Connected components of integer label maps, batched: every same-label piece gets an id.

Two pixels are connected when they are neighbours (8- or 4-connectivity) with the same label.
The torch backend is exact for any shape (spirals, snakes): it starts from the runs of equal
labels in each row, then hooks the larger of two neighbouring roots onto the smaller
(``scatter_reduce`` amin over the pairs still joining two trees) and compresses paths by
pointer jumping, until no neighbouring same-label pair has two different roots. Each pixel's
root is the first pixel of its piece in raster order, so pieces are numbered 1..N in the
order of their first pixel, as ``scipy.ndimage.label`` numbers them.

Backends: ``"torch"`` (any device), ``"native"`` (the C kernel ``kernels/components.c``, CPU
tensors: run-based union-find per image, images spread over threads, same numbering, bit
for bit), ``"cupy"`` (optional) and ``"auto"`` (native for CPU tensors when the kernel
builds, else torch). On the CPU the torch path spends most of its time in many small ops
over all pixels; the C kernel touches each pixel about twice.
"""
from __future__ import annotations

import ctypes
import importlib.util

import torch
from torch import Tensor

from pccfast.core.checks import check_tensor

__all__ = ["BACKENDS", "connected_components", "resolve_backend"]

BACKENDS = ("auto", "torch", "native", "cupy")
_NATIVE_MAX_PIXELS = 2**31 - 1  # the C kernel numbers runs with int32: H * W has to stay below

# neighbour offsets (dy, dx) to the next row; same-row neighbours are merged as runs first
_DOWN_OFFSETS = {4: ((1, 0),), 8: ((1, -1), (1, 0), (1, 1))}


def _shifted(dx: int, w: int) -> tuple[slice, slice]:
    """Column slices of p and of q = p + dx such that both lie inside the row."""
    return slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w + min(0, dx))


def _row_runs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Every pixel's parent = the first pixel of its run of equal labels in its row.

    labels: (B, H, W) -> parents (B*H*W,) flat indices (already roots, so the forest is
    compressed) and the run starts (B, H, W) bool
    """
    b, h, w = labels.shape
    col = torch.arange(w, device=labels.device).expand(b, h, w)  # (B, H, W)
    start = torch.ones_like(labels, dtype=torch.bool)  # (B, H, W) run starts
    start[..., 1:] = labels[..., 1:] != labels[..., :-1]
    first = torch.cummax(torch.where(start, col, torch.zeros_like(col)), dim=-1).values  # (B, H, W)
    row_base = torch.arange(b * h, device=labels.device).view(b, h, 1) * w  # (B, H, 1)
    return (row_base + first).reshape(-1), start


def _compress(parent: Tensor) -> Tensor:
    """Pointer jumping until every pixel points at its root. parent: (n,) -> (n,)"""
    while True:
        grand = parent[parent]
        if torch.equal(grand, parent):
            return parent
        parent = grand


def _components_torch(labels: Tensor, connectivity: int) -> Tensor:
    """labels: (B, H, W) int -> (B, H, W) long piece ids, 1..N per image, 0 where labels < 0.

    Invariant: parent[i] <= i and parent[i] lies in i's piece, so roots are the pieces' first
    pixels. Starting from the row runs, each round hooks, for every neighbouring pair (p, q)
    with equal labels whose roots differ, the larger root onto the smaller (a scatter with
    amin), then compresses. Only one pair per touching run segment is needed, and roots only
    ever merge, so a pair with equal roots never matters again and leaves the list. A round
    without such a pair means every piece is one tree.
    """
    b, h, w = labels.shape
    n = b * h * w
    parent, start = _row_runs(labels)  # (n,) row runs are already merged; (B, H, W)
    idx = torch.arange(n, device=labels.device).view(b, h, w)  # (B, H, W) flat index
    ps, qs = [], []
    for dy, dx in _DOWN_OFFSETS[connectivity]:  # pairs to the next row
        xp, xq = _shifted(dx, w)
        a, c = labels[:, : h - dy, xp], labels[:, dy:, xq]  # (B, H-dy, w') labels of p and q
        # a pair whose left neighbours (p-1, q-1) lie in the same runs joins the same two
        # runs, so keep only pairs where p or q starts its run (column 0 always does)
        keep = (a == c) & (a >= 0) & (start[:, : h - dy, xp] | start[:, dy:, xq])
        ps.append(idx[:, : h - dy, xp][keep])
        qs.append(idx[:, dy:, xq][keep])
    p, q = torch.cat(ps), torch.cat(qs)  # (E,) pairs that may join two trees
    while p.numel():
        rp, rq = parent[p], parent[q]  # roots (parent is compressed)
        diff = rp != rq
        if not bool(diff.all()):
            p, q, rp, rq = p[diff], q[diff], rp[diff], rq[diff]
            if not p.numel():
                break
        parent = parent.scatter_reduce(0, torch.maximum(rp, rq), torch.minimum(rp, rq), reduce="amin")
        parent = _compress(parent)  # hook larger root onto smaller, then compress
    flat = torch.arange(n, device=labels.device)
    is_root = ((parent == flat) & (labels.reshape(-1) >= 0)).view(b, h * w)  # (B, HW)
    number = torch.cumsum(is_root, dim=1).view(-1)  # (B*HW,) 1..N per image at roots
    out = number[parent].view(b, h, w)  # (B, H, W)
    return torch.where(labels >= 0, out, torch.zeros_like(out))


def _native_lib():
    """The compiled ``kernels/components.c`` with its argument types (raises NativeUnavailable)."""
    from pccfast.backends import native

    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    return native.typed("components", {"pcc_components": ([vp, i64, i64, i64, i32, vp, i32], ctypes.c_int)})


def _components_native(labels: Tensor, connectivity: int) -> Tensor:
    """labels: (B, H, W) long CPU -> (B, H, W) long piece ids (the C kernel, same numbering)."""
    from pccfast.backends import native

    lib = _native_lib()
    labels = labels.contiguous()
    b, h, w = labels.shape
    out = torch.empty_like(labels)  # (B, H, W)
    status = lib.pcc_components(native.ptr(labels), b, h, w, connectivity, native.ptr(out), native.num_threads())
    if status == 1:
        raise MemoryError(f"components kernel: out of memory for labels of shape {tuple(labels.shape)}")
    if status:
        raise ValueError(f"components kernel: labels of shape {tuple(labels.shape)} are too large (status {status})")
    return out


def _components_cupy(labels: Tensor, connectivity: int) -> Tensor:
    """One ``cupyx.scipy.ndimage.label`` call per image and label value."""
    if importlib.util.find_spec("cupy") is None:
        raise ImportError(
            "components backend 'cupy' needs CuPy, which is not installed: "
            "pip install cupy-cuda12x (CUDA 12), or use backend='torch'"
        )
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


def resolve_backend(backend: str, labels: Tensor) -> str:
    """The implementation ``backend`` stands for with ``labels``: "auto" is "native" (the C
    kernel) for CPU tensors when it builds, else "torch"; "native" needs a CPU tensor and the
    kernel (``NativeUnavailable`` otherwise); "torch" and "cupy" are themselves. Images of
    2^31 - 1 pixels or more (int32 run ids in the kernel) go to torch under "auto".

    labels: (*, H, W)

    Raises:
        ValueError: an unknown backend, or "native" with labels off the CPU or too large.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` has to be one of {', '.join(map(repr, BACKENDS))} but is {backend!r}")
    fits = labels.shape[-2] * labels.shape[-1] < _NATIVE_MAX_PIXELS
    if backend == "native" and not fits:
        raise ValueError(f"components backend 'native' takes images of fewer than 2^31 - 1 pixels but they are "
                         f"{labels.shape[-2]} x {labels.shape[-1]}; use backend='torch'")
    from pccfast.backends.native import resolve

    return resolve(backend, labels, "components", "components", "backend", fits=fits)


def connected_components(labels: Tensor, connectivity: int = 8, *, backend: str = "torch") -> Tensor:
    """Split every label of every image into its connected pieces.

    Args:
        labels: (*, H, W) integer label maps (e.g. cluster ids); negative entries are masked
            (they get id 0 and connect to nothing).
        connectivity: 8 (3x3 structure, the reference) or 4.
        backend: "auto" (the C kernel for CPU tensors when it builds, else torch), "torch"
            (any device), "native" (the C kernel, CPU tensors only) or "cupy" (optional).
            All give the same ids.

    Returns:
        (*, H, W) long piece ids, consecutive 1..N per image, numbered in raster order of each
        piece's first pixel; 0 only where ``labels`` is negative.

    Raises:
        ValueError: bad ``connectivity``, shape or ``backend``, or "native" off the CPU.
        NativeUnavailable: backend "native" and the C kernel cannot be built or loaded.
    """
    check_tensor(labels, "labels", integer=True)
    if labels.ndim < 2:
        raise ValueError(f"`labels` has to have at least 2 dimensions (H, W) but has shape {tuple(labels.shape)}")
    if connectivity not in (4, 8):
        raise ValueError(f"`connectivity` has to be 4 or 8 but is {connectivity}")
    lead, (h, w) = labels.shape[:-2], labels.shape[-2:]
    impl = resolve_backend(backend, labels)
    flat = labels.reshape(-1, h, w).long()  # (B, H, W)
    if impl == "native":
        out = _components_native(flat, connectivity)
    elif impl == "cupy":
        out = _components_cupy(flat, connectivity)
    else:
        out = _components_torch(flat, connectivity)
    return out.reshape(*lead, h, w)
