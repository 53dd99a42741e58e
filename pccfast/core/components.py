"""Connected components of integer label maps, batched: every same-label piece gets an id.

Two pixels are connected when they are neighbours (8- or 4-connectivity) with the same label.
The torch backend is exact for any shape (spirals, snakes): it starts from the runs of equal
labels in each row, then hooks the larger of two neighbouring parents onto the smaller
(``scatter_reduce`` amin over the pairs of neighbouring runs) and jumps pointers, until every
pixel points at a root and no neighbouring same-label pair has two different roots. The
rounds run on a fixed schedule: the host checks convergence after ``ROUNDS_PER_CHECK``
rounds, then after twice as many each time, so on a GPU a call costs a few synchronisations,
not one per round (off the CPU the pair list also keeps its fixed shape, without a
``nonzero``). Each pixel's root is the first pixel of its piece in raster order, so pieces
are numbered 1..N in the order of their first pixel, as ``scipy.ndimage.label`` numbers them.

Backends (``pccfast.backends.OPERATIONS["components"]``): ``"torch"`` (any device, this
module), ``"native"`` (the C kernel ``kernels/components.c``, CPU tensors: run-based
union-find per image, images spread over threads, same numbering, bit for bit), ``"cupy"``
(optional, ``backends.rapids``) and ``"auto"`` (native for CPU tensors when the kernel
builds, else torch). On the CPU the torch path spends most of its time in many small ops
over all pixels; the C kernel touches each pixel about twice.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pccfast.backends import kernels, rapids, resolve
from pccfast.core.checks import check_tensor, cpu_tuned

__all__ = ["ROUNDS_PER_CHECK", "connected_components"]

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


# hook-and-jump rounds between two host checks of convergence: on a GPU each check is one
# synchronisation, and a round after convergence changes nothing, so a few spare rounds cost
# only their kernels; the SD-sized maps of the labeller converge within one or two checks
ROUNDS_PER_CHECK = 4


def _pairs(labels: Tensor, start: Tensor, connectivity: int, compact: bool) -> tuple[Tensor, Tensor]:
    """Neighbouring pixel pairs (p, q) to the next row that may join two row runs.

    A pair whose left neighbours (p-1, q-1) lie in the same runs joins the same two runs, so
    only pairs where p or q starts its run count (column 0 always does), with equal labels
    >= 0. ``compact``: keep only those (one ``nonzero``, a single host sync); else every pair
    of the grid, a pair that does not count made a self-pair (q = p, a no-op), fixed shape.

    labels: (B, H, W), start: (B, H, W) bool run starts -> p, q (E,) flat indices
    """
    b, h, w = labels.shape
    idx = torch.arange(b * h * w, device=labels.device).view(b, h, w)  # (B, H, W) flat index
    ps, qs, keeps = [], [], []
    for dy, dx in _DOWN_OFFSETS[connectivity]:  # pairs to the next row
        xp, xq = _shifted(dx, w)
        a, c = labels[:, : h - dy, xp], labels[:, dy:, xq]  # (B, H-dy, w') labels of p and q
        keeps.append(((a == c) & (a >= 0) & (start[:, : h - dy, xp] | start[:, dy:, xq])).reshape(-1))
        ps.append(idx[:, : h - dy, xp].reshape(-1))
        qs.append(idx[:, dy:, xq].reshape(-1))
    p, q, keep = torch.cat(ps), torch.cat(qs), torch.cat(keeps)  # (E',) each, raster order per offset
    if compact:
        sel = keep.nonzero().squeeze(1)  # (E,)
        return p[sel], q[sel]
    return p, torch.where(keep, q, p)


def _components_torch(labels: Tensor, connectivity: int, rounds_per_check: int = ROUNDS_PER_CHECK,
                      compact: bool | None = None) -> Tensor:
    """labels: (B, H, W) int -> (B, H, W) long piece ids, 1..N per image, 0 where labels < 0.

    Invariant: parent[i] <= i and parent[i] lies in i's piece, so roots are the pieces' first
    pixels. Starting from the row runs, each round hooks, for every neighbouring pair (p, q)
    with equal labels, the larger of their parents onto the smaller (a scatter with amin)
    where that parent is a root (hooking a non-root would cut its link to its own tree),
    then jumps pointers once (parent = parent[parent]). Parents only ever decrease, so the
    rounds reach a fixed point, and there every pixel points at a root (else the jump would
    move it) and every pair has one root (else the hook would move it): every piece is one
    tree rooted at its first pixel, whatever the schedule, so the numbering never depends
    on it. The host checks the fixed point after ``rounds_per_check`` rounds, then after
    twice as many more, and so on (one sync per check, O(log rounds) in all).

    compact: drop the pairs that cannot join two runs first (one sync, fewer pairs per
    round); None: on the CPU only, where a sync costs nothing.
    """
    b, h, w = labels.shape
    n = b * h * w
    if compact is None:
        compact = cpu_tuned(labels.device)
    parent, start = _row_runs(labels)  # (n,) row runs are already merged; (B, H, W)
    p, q = _pairs(labels, start, connectivity, compact)  # (E,) pairs that may join two trees
    rounds = max(rounds_per_check, 1)
    while True:
        for _ in range(rounds):
            rp, rq = parent[p], parent[q]  # (E,)
            hi, lo = torch.maximum(rp, rq), torch.minimum(rp, rq)  # (E,)
            up = parent[hi]  # (E,) a non-root keeps its parent (amin with it is a no-op)
            parent = parent.scatter_reduce(0, hi, torch.where(up == hi, lo, up), reduce="amin")
            parent = parent[parent]  # hook larger roots onto smaller, then jump
        grand = parent[parent]
        if bool((grand == parent).all() & (grand[p] == grand[q]).all()):  # the one sync per check
            break
        parent, rounds = grand, 2 * rounds  # long chains (spirals): O(log rounds) checks
    flat = torch.arange(n, device=labels.device)
    is_root = ((parent == flat) & (labels.reshape(-1) >= 0)).view(b, h * w)  # (B, HW)
    number = torch.cumsum(is_root, dim=1).view(-1)  # (B*HW,) 1..N per image at roots
    out = number[parent].view(b, h, w)  # (B, H, W)
    return torch.where(labels >= 0, out, torch.zeros_like(out))


def _resolve(backend: str, labels: Tensor) -> str:
    """The backend that runs for ``labels`` (``backends.resolve``): images of 2^31 - 1 pixels or
    more (int32 run ids in the kernel) go to torch under "auto" and are refused by "native".

    labels: (*, H, W)

    Raises:
        ValueError: an unknown backend, or "native" with labels off the CPU or too large.
        NativeUnavailable: "native" and the kernel cannot be built or is disabled.
    """
    fits = labels.shape[-2] * labels.shape[-1] < kernels.MAX_COMPONENT_PIXELS
    if backend == "native" and not fits:
        raise ValueError(f"components backend 'native' takes images of fewer than 2^31 - 1 pixels but they are "
                         f"{labels.shape[-2]} x {labels.shape[-1]}; use backend='torch'")
    return resolve("components", backend, labels, fits=fits)


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
    impl = _resolve(backend, labels)
    flat = labels.reshape(-1, h, w).long()  # (B, H, W)
    if impl == "native":
        out = kernels.components(flat, connectivity)
    elif impl == "cupy":
        out = rapids.components_cupy(flat, connectivity)
    else:
        out = _components_torch(flat, connectivity)
    return out.reshape(*lead, h, w)
