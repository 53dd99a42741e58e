"""Batched k-means (scikit-learn's Lloyd with greedy k-means++), one problem per batch item.

Reference settings (section 2): k-means++ init, Lloyd, ``tol=1e-4`` relative to the mean
per-feature variance, at most 300 iterations, one initialisation, fixed seed. Distances use
``||x||^2 - 2 x.c + ||c||^2`` with a batched matmul; nothing is (N x N). The seeding is
``pccfast.core.seeding`` (k-means++ by an exponential race; its random numbers can be kept
in a caller's ``SeedingCache``).

Backends (``pccfast.backends.OPERATIONS["kmeans"]``): ``"torch"`` (any device, this
module's Lloyd loop: no host synchronisation between its convergence checks, one every
``check_every`` iterations, so a GPU never waits on the host), ``"native"`` (the C kernel ``kernels/kmeans.c``, CPU), ``"cuml"``
(RAPIDS cuML, optional, one call per item) and ``"auto"``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pccfast.backends import kernels, rapids, resolve
from pccfast.backends.kernels import NARROW_D
from pccfast.core.checks import check_tensor, cpu_tuned, local_generator
from pccfast.core.seeding import SeedingCache, _chunk, _rows, kmeans_plusplus, kmeans_plusplus_native

__all__ = ["kmeans", "kmeans_many", "kmeans_plusplus", "kmeans_inertia", "assign", "prepare_points", "PreparedPoints",
           "SeedingCache", "NARROW_D"]


_SLOTS = 8  # partial sums per cluster and feature in the M-step for narrow points


def _argmin_weight(k: int, device: torch.device) -> Tensor:
    """(1, k, 1) weights k - j of ``_argmin_rows`` (uint8 for k < 256), computed once per k-means."""
    wdtype = torch.uint8 if k < 256 else torch.int32
    return (k - torch.arange(k, device=device)).to(wdtype)[None, :, None]  # (1, k, 1)


def _argmin_rows(scores: Tensor, weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Minimum over dim 1 and its first index. scores: (B, k, n) -> (B, n), (B, n) long.

    Same result as ``scores.min(1)`` (first index on ties), which off the CPU is what it
    uses; on the CPU it is vectorised along the contiguous point axis: ``amin`` then the
    largest of (k - j) over the minimal rows j. weight: optional ``_argmin_weight(k)``.
    """
    if not cpu_tuned(scores.device):
        best, first = scores.min(dim=1)  # first index of the minimum, as documented
        return best, first
    k = scores.shape[1]
    if weight is None:
        weight = _argmin_weight(k, scores.device)  # (1, k, 1)
    best = scores.amin(dim=1, keepdim=True)  # (B, 1, n)
    first = k - ((scores == best) * weight).amax(dim=1).long()  # (B, n)
    return best[:, 0], first


def _assign_t(xt: Tensor, centers: Tensor, x_sq: Tensor, weight: Optional[Tensor] = None,
              pad: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Nearest centres with points in columns, for P clusterings of the same points at once.

    xt: (B, D, N) contiguous, centers: (B, k, D) or (B, P, k, D) (P problems on the same
    points, e.g. k-means with several k, padded to one k), x_sq: (B, N), weight: optional
    ``_argmin_weight(k)``, pad: optional (P, k) with 0 for real and +inf for padding centres
    (never nearest) -> labels (B, N) or (B, P, N), sq. distance (B, N) or (B, P, N)
    """
    b, _, n = xt.shape
    many = centers.dim() == 4
    p, k = (centers.shape[1], centers.shape[2]) if many else (1, centers.shape[1])
    flat = centers.reshape(b, p * k, -1)  # (B, P*k, D), a view
    if weight is None and cpu_tuned(xt.device):
        weight = _argmin_weight(k, xt.device)  # (1, k, 1), shared by the chunks
    c_sq = (flat * flat).sum(-1)  # (B, P*k)
    if pad is not None:
        c_sq = c_sq + pad.reshape(1, p * k)  # padding centres at infinity
    c_sq = c_sq[..., None]  # (B, P*k, 1)
    step = _chunk(n, p * k, b, xt.device)
    labels, dist = [], []
    for start in range(0, n, step):  # chunks along the points keep the scores small
        part = xt if step >= n else xt[:, :, start:start + step]  # (B, D, n')
        scores = torch.baddbmm(c_sq, flat, part, alpha=-2.0)  # (B, P*k, n')
        best, idx = _argmin_rows(scores.view(b * p, k, -1), weight)  # (B*P, n') each
        labels.append(idx)
        dist.append(best)
    labels_t = torch.cat(labels, dim=1) if len(labels) > 1 else labels[0]  # (B*P, N)
    best_t = torch.cat(dist, dim=1) if len(dist) > 1 else dist[0]  # (B*P, N)
    shape = (b, p, n) if many else (b, n)
    x_sq = x_sq[:, None] if many else x_sq  # (B, 1, N) or (B, N)
    return labels_t.view(shape), (best_t.view(shape) + x_sq).clamp_min_(0)


def assign(x: Tensor, centers: Tensor, x_sq: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Nearest centre of every point (first centre on ties).

    Args:
        x: (B, N, D); centers: (B, k, D); x_sq: optional (B, N) squared norms of x.

    Returns:
        labels (B, N) long, squared distance to that centre (B, N) (clamped at 0).
    """
    if x_sq is None:
        x_sq = (x * x).sum(-1)
    return _assign_t(x.transpose(1, 2).contiguous(), centers.to(x.dtype), x_sq)


def kmeans_inertia(x: Tensor, labels: Tensor, centers: Tensor) -> Tensor:
    """Sum of squared distances to the assigned centres. (B, N, D), (B, N), (B, k, D) -> (B,)."""
    picked = torch.gather(centers, 1, labels[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, D)
    return ((x - picked) ** 2).sum(dim=(1, 2))


class _Sums(NamedTuple):
    """What every M-step of one k-means shares (``_sums_setup``)."""

    offset: Tensor  # (P, B, 1) long, (b * P + p) * k: item-major cluster ids of problem p
    slot: Optional[Tensor]  # (N,) long, (j % S) * k, narrow points only
    pts: Tensor  # narrow: (B, D', N) x^T; wide: (B*N, D') x; D' = D + 1 with a ones feature
    ones: bool  # the last feature is ones, whose sums are the counts (exact below 2^24 points)


def _sums_setup(x: Tensor, k: int, xt: Optional[Tensor] = None, problems: int = 1) -> _Sums:
    """Index offsets and the points of the M-step's sums, with a ones feature whose sum per
    cluster is its count when N < 2^24 (float32 counts up to there are exact).

    x: (B, N, D), xt: optional (B, D, N), problems: P clusterings of these points -> ``_Sums``
    """
    b, n, d = x.shape
    ones = n < 1 << 24
    item = torch.arange(b, device=x.device)[None, :, None] * problems  # (1, B, 1)
    offset = (item + torch.arange(problems, device=x.device)[:, None, None]) * k  # (P, B, 1)
    if d <= 16:
        xt = x.transpose(1, 2) if xt is None else xt  # (B, D, N)
        pts = torch.cat([xt, xt.new_ones(b, 1, n)], dim=1) if ones else xt.contiguous()  # (B, D', N)
        slot = (torch.arange(n, device=x.device) % _SLOTS) * k  # (N,)
        return _Sums(offset, slot, pts, ones)
    pts = torch.cat([x, x.new_ones(b, n, 1)], dim=2) if ones else x  # (B, N, D')
    return _Sums(offset, None, pts.reshape(b * n, -1), ones)  # (B*N, D')


def _update(x: Tensor, labels: Tensor, min_dist: Tensor, old: Tensor, k: int, xt: Optional[Tensor] = None,
            keep: Optional[Tensor] = None, shared: Optional[_Sums] = None, valid: Optional[Tensor] = None) -> Tensor:
    """Lloyd M-step with scikit-learn's empty-cluster relocation, without a host synchronisation.

    An empty cluster takes one of the points farthest from their centres (the j-th empty
    cluster of an item takes its j-th farthest point), which leaves its old cluster. The
    relocation is computed for every item and applied with ``torch.where`` (an item with no
    empty cluster adds zero rows: a no-op), so nothing is read back on the host. Counts are
    the sums of a ones feature, or a scatter of ones (no ``bincount``).

    x: (B, N, D); labels, min_dist: (B, N) (or (B, P, N): P clusterings of the same points);
    old: (B, k, D) (or (B, P, k, D)); xt: optional (B, D, N) contiguous transpose of x; keep:
    optional (B,) (or (B, P)) bool, False keeps an item's ``old`` centres; shared: optional
    ``_sums_setup(x, k, xt, P)``; valid: optional (P, k) bool, False for padding centres
    (never relocated into) -> (B, k, D) (or (B, P, k, D))
    """
    many = labels.dim() == 3
    if not many:
        labels, min_dist, old = labels[:, None], min_dist[:, None], old[:, None]
        keep = keep[:, None] if keep is not None else None
    b, n, d = x.shape
    p = labels.shape[1]
    shared = _sums_setup(x, k, xt, p) if shared is None else shared
    dd = shared.pts.shape[1] if shared.slot is not None else shared.pts.shape[-1]  # D or D + 1
    if shared.slot is not None:  # few long rows: sum along the contiguous point axis of x^T
        # point j adds into slot j % S of its cluster: consecutive points never wait on one
        # accumulator (3x faster on the CPU), and S partial sums lose less to float32 rounding
        # than one running sum
        parts = []
        for j in range(p):  # the clusterings (one per k), not clusters
            idx = (labels[:, j] + shared.slot)[:, None, :].expand(b, dd, n)  # (B, D', N) in [0, S*k)
            part = torch.zeros(b, dd, _SLOTS * k, device=x.device, dtype=x.dtype).scatter_add_(2, idx, shared.pts)
            parts.append(part.view(b, dd, _SLOTS, k).sum(2).transpose(1, 2))  # (B, k, D')
        sums = torch.stack(parts, dim=1) if p > 1 else parts[0][:, None]  # (B, P, k, D')
    else:  # wide points: whole rows at once, every clustering into its own rows
        sums = torch.zeros(b * p * k, dd, device=x.device, dtype=x.dtype)
        for j in range(p):  # the clusterings (one per k), not clusters
            sums.index_add_(0, (labels[:, j] + shared.offset[j]).reshape(-1), shared.pts)
        sums = sums.view(b, p, k, dd)  # (B, P, k, D')
    if not shared.ones:  # exact integer counts by a scatter (bincount reads its maximum back on the host)
        flat = (labels + shared.offset.permute(1, 0, 2)).reshape(-1)  # (B*P*N,) item-major ids
        counts = torch.zeros(b * p * k, device=x.device, dtype=torch.long).scatter_add_(
            0, flat, flat.new_ones(()).expand(b * p * n)).view(b, p, k).to(x.dtype)  # (B, P, k)
        sums = torch.cat([sums, counts[..., None]], dim=-1)  # (B, P, k, D + 1)
    new = _relocate(x, shared, labels, min_dist, old, sums, keep, valid)
    return new if many else new[:, 0]


def _relocate(x: Tensor, shared: _Sums, labels: Tensor, min_dist: Tensor, old: Tensor, sums: Tensor,
              keep: Optional[Tensor], valid: Optional[Tensor]) -> Tensor:
    """Empty clusters take the farthest points, then the means.

    sums: (B, P, k, D + 1), the last feature the counts; labels, min_dist: (B, P, N); old:
    (B, P, k, D); keep: optional (B, P); valid: optional (P, k) -> (B, P, k, D)
    """
    b, p, k, d1 = sums.shape
    n = labels.shape[-1]
    empty = sums[..., -1] == 0  # (B, P, k)
    if valid is not None:
        empty = empty & valid  # padding centres stay empty
    far = min_dist.topk(k, dim=-1).indices  # (B, P, k) farthest points first
    # the j-th empty cluster takes the j-th farthest point; a non-empty one gets an index in
    # range that it does not use (its row is zeroed below)
    rank = empty.cumsum(-1) - empty.long()  # (B, P, k) long in [0, k)
    point = torch.gather(far, 2, rank)  # (B, P, k): the point an empty cluster takes
    if shared.slot is not None:  # (B, D', N): its columns, then rows
        dp = shared.pts.shape[1]
        px = torch.gather(shared.pts, 2, point.view(b, 1, p * k).expand(b, dp, p * k)).transpose(1, 2)
    else:  # (B*N, D') rows
        px = _rows(shared.pts.view(b, n, -1), point.view(b, p * k))  # (B, P*k, D')
    if not shared.ones:
        px = torch.cat([px, px.new_ones(b, p * k, 1)], dim=-1)
    px = px.view(b, p, k, d1) * empty[..., None]  # zero rows for non-empty clusters; ones column 1 if empty
    src = torch.gather(labels, 2, point)  # (B, P, k) the cluster that point leaves
    # the point (and its count of 1) leaves `src` (adding -0.0 changes nothing) and becomes the
    # empty cluster's only member: an empty cluster is never a point's cluster, so never a `src`
    sums = torch.where(empty[..., None], px, sums.scatter_add(2, src[..., None].expand(-1, -1, -1, d1), -px))
    counts = sums[..., -1:]  # (B, P, k, 1)
    new = sums[..., :-1] / counts  # (B, P, k, D); a count of 0 keeps the old centre below
    use = counts > 0 if keep is None else (counts > 0) & keep[..., None, None]  # (B, P, k, 1)
    return torch.where(use, new, old)


class PreparedPoints(NamedTuple):
    """What every k-means of the same points shares (``prepare_points``, ``features.clustering_points``)."""

    x: Tensor  # (B, N, D) centred points (possibly a transposed view of ``xt``)
    mean: Tensor  # (B, 1, D) the column means taken off
    xt: Optional[Tensor]  # (B, D, N) contiguous centred transpose, or None
    x_sq: Optional[Tensor]  # (B, N) squared norms of the centred points, or None
    var: Tensor  # (B,) mean feature variance (scikit-learn's tolerance scale)


def prepare_points(x: Tensor, transpose: bool = True, norms: bool = True) -> PreparedPoints:
    """What every k-means of the same points shares: compute it once and pass it to
    ``kmeans(..., prepared=)`` for several k (the blocky mask clusters one feature tensor
    with k = 4, 7 and 10).

    Points stored feature-major (``x`` a transposed view of a contiguous (B, D, N) tensor,
    as ``refine.refine_points`` returns) are centred in that layout: the transpose is then
    free and the centred x is again a transposed view.

    x: (B, N, D) float -> ``PreparedPoints``: centred ``x`` (B, N, D), ``mean`` (B, 1, D),
    centred ``xt`` (B, D, N) contiguous (None unless ``transpose`` or free; the torch backend
    and narrow points in the C kernel need it), squared norms ``x_sq`` (B, N) (None unless
    ``norms``; the torch backend needs them), mean feature variance ``var`` (B,)
    """
    mean = x.mean(dim=1, keepdim=True)  # (B, 1, D); centring as scikit-learn, for precision
    if x.shape[-1] > 1 and x.transpose(1, 2).is_contiguous():  # feature-major storage
        xt = (x.transpose(1, 2) - mean.transpose(1, 2)).contiguous()  # (B, D, N)
        x = xt.transpose(1, 2)  # (B, N, D) view
    else:
        x = (x - mean).contiguous()
        xt = x.transpose(1, 2).contiguous() if transpose else None  # (B, D, N), points in columns
    x_sq = ((xt * xt).sum(1) if xt is not None else (x * x).sum(-1)) if norms else None  # (B, N)
    sq = x_sq.sum(1) if norms else torch.linalg.vector_norm(x, dim=(1, 2)).square()  # (B,)
    var = sq / x[0].numel()  # (B,) scikit-learn's _tolerance / tol (x is centred)
    return PreparedPoints(x, mean, xt, x_sq, var)


def _kmeans_torch(
    x: Tensor, k: int, max_iter: int, tol: float, generator: torch.Generator, streams: int = 1,
    init: Optional[Tensor] = None, prepared: Optional[PreparedPoints] = None, cache: Optional[SeedingCache] = None,
    check_every: int = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    """The torch path for one k: k-means++ then :func:`_lloyd`.

    x: (B, N, D) float, init: optional (B, k, D), prepared: optional ``prepare_points(x)``
    with the transpose and norms -> labels (B, N), centers (B, k, D), inertia (B,)
    """
    prepared = prepared if prepared is not None else prepare_points(x)
    if init is None:
        centers = kmeans_plusplus(prepared.x, k, generator, prepared.x_sq, streams, prepared.xt, cache)  # (B, k, D)
    else:
        centers = init.to(prepared.x.dtype) - prepared.mean
    labels, centers, inertia = _lloyd(prepared, centers[:, None], None, max_iter, tol, check_every)
    return labels[:, 0], centers[:, 0], inertia[:, 0]


def _lloyd(prepared: PreparedPoints, centers: Tensor, pad: Optional[Tensor], max_iter: int, tol: float,
           check_every: int) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations for P clusterings of the same points at once, without host
    synchronisations between checks.

    Converged clusterings stay in the batch, masked: their centres are frozen (further
    iterations are no-ops for them), so no iteration reads a mask back to compact the batch.
    Whether every one has converged is read on the host once every ``check_every`` iterations.
    Each clustering gets exactly the iterations it would get alone, so its result does not
    depend on the others.

    prepared: ``prepare_points`` of x (B, N, D) with the transpose and norms; centers: (B, P,
    k, D) centred initial centres (padding rows zero); pad: optional (P, k), 0 for real and
    +inf for padding centres -> labels (B, P, N), centers (B, P, k, D) (not centred), inertia (B, P)
    """
    x, mean, xt, x_sq, var = prepared
    b, p, k, _ = centers.shape
    tol_abs = (tol * var)[:, None]  # (B, 1)
    weight = _argmin_weight(k, x.device) if cpu_tuned(x.device) else None  # (1, k, 1)
    shared = _sums_setup(x, k, xt, p)
    valid = None if pad is None else pad == 0  # (P, k)
    running = torch.ones(b, p, dtype=torch.bool, device=x.device)  # (B, P) clusterings not yet converged
    prev = None
    for it in range(max_iter):
        labels, min_dist = _assign_t(xt, centers, x_sq, weight, pad)  # (B, P, N), (B, P, N)
        # converged clusterings keep their centres (and then their shift is 0)
        new = _update(x, labels, min_dist, centers, k, xt, running, shared, valid)  # (B, P, k, D)
        shift = F.mse_loss(new, centers, reduction="none").sum(dim=(2, 3))  # (B, P): (new - centers)^2 in one op
        # converged: a small shift, or (strict convergence) labels unchanged, which leaves
        # `new` equal to `centers`
        running = running & (shift > tol_abs)
        if prev is not None:
            running = running & (labels != prev).any(-1)
        centers = new
        prev = labels
        if (it + 1) % check_every == 0 and it + 1 < max_iter and not bool(running.any()):
            break  # the one host read, every `check_every` iterations
    labels, min_dist = _assign_t(xt, centers, x_sq, weight, pad)  # final E-step, as scikit-learn
    return labels, centers + mean[:, None], min_dist.sum(-1)


def _kmeans_torch_many(
    prepared: PreparedPoints, ks: tuple, generators: list, max_iter: int, tol: float,
    cache: Optional[SeedingCache], check_every: int,
) -> list:
    """k-means of the same points for every k in ``ks`` in one Lloyd loop (padded to the
    largest k): each k-means++ seeding as alone, in order, then one E-step per iteration for
    all of them -> labels (B, N) per k"""
    x, xt, x_sq = prepared.x, prepared.xt, prepared.x_sq
    kmax = max(ks)
    inits, pads = [], []
    for k, gen in zip(ks, generators):  # a handful of k values, each seeded exactly as alone
        c = kmeans_plusplus(x, k, gen, x_sq, 1, xt, cache)  # (B, k, D)
        inits.append(torch.cat([c, c.new_zeros(c.shape[0], kmax - k, c.shape[2])], 1) if k < kmax else c)
        pads.append(torch.cat([x.new_zeros(k), x.new_full((kmax - k,), float("inf"))]))
    pad = torch.stack(pads) if any(k < kmax for k in ks) else None  # (P, kmax)
    labels, _, _ = _lloyd(prepared, torch.stack(inits, dim=1), pad, max_iter, tol, check_every)  # (B, P, N)
    return list(labels.unbind(1))


def _kmeans_native(
    x: Tensor, k: int, max_iter: int, tol: float, generator: torch.Generator, streams: int = 1,
    init: Optional[Tensor] = None, prepared: Optional[PreparedPoints] = None, prune: bool = True,
    cache: Optional[SeedingCache] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The C kernel: k-means++ then Lloyd with exact Hamerly/Elkan pruning (``kernels/kmeans.c``).

    x: (B, N, D) float32 CPU, init: optional (B, k, D), prepared: optional
    ``prepare_points(x)`` (float32; with the transpose for D <= NARROW_D)
    -> labels (B, N), centers (B, k, D), inertia (B,)
    """
    if prepared is None:
        prepared = prepare_points(x, transpose=x.shape[-1] <= NARROW_D, norms=False)
    xc, mean, xt, _, var = prepared  # centred (B, N, D), (B, 1, D), (B, D, N) or None, _, (B,)
    n, d = xc.shape[1:]
    tol_abs = (tol * var.double()).contiguous()  # (B,) float64
    if init is None:
        centers = kmeans_plusplus_native(xc, k, generator, streams, xt, cache)
    else:
        centers = init.to(torch.float32) - mean
    centers = centers.contiguous().clone()  # (B, k, D) updated in place
    labels, min_dist, _ = kernels.kmeans_lloyd(kernels.kernel_points(xc, xt), n, d, centers, tol_abs, max_iter,
                                               prune)
    return labels, centers + mean, min_dist.sum(-1)


def _check_settings(max_iter: int, tol: float, check_every: int) -> None:
    """The Lloyd loop's settings, as ``kmeans`` and ``kmeans_many`` take them."""
    if max_iter < 1:
        raise ValueError(f"`max_iter` has to be at least 1 but is {max_iter}")
    if tol < 0:
        raise ValueError(f"`tol` has to be >= 0 but is {tol}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"`check_every` has to be an integer of at least 1 but is {check_every!r}")


def kmeans(
    x: Tensor,
    k: int,
    *,
    max_iter: int = 300,
    tol: float = 1e-4,
    generator: Optional[torch.Generator] = None,
    n_init: int = 1,
    seed: int = 0,
    backend: str = "auto",
    init: Optional[Tensor] = None,
    prepared: Optional[PreparedPoints] = None,
    cache: Optional[SeedingCache] = None,
    check_every: int = 4,
) -> tuple[Tensor, Tensor]:
    """k-means of every batch item: greedy k-means++ then Lloyd (scikit-learn 1.4 semantics).

    Convergence per item: labels unchanged, or the squared centre shift summed over centres
    at most ``tol * mean(var(x, dim=N))``; items that converged keep their centres (the torch
    backend masks them instead of reading anything back on the host).

    Args:
        x: (B, N, D) points (computed in float32 unless float64).
        k: clusters per item (1 <= k <= N).
        max_iter: Lloyd iteration cap.
        tol: relative tolerance (scikit-learn's).
        generator: local generator for k-means++ (default: seeded with ``seed``). Every
            batch item uses the same random numbers, so an image gets the same clusters
            whatever it is batched with.
        n_init: restarts, each with its own random numbers; the lowest inertia wins
            (restarts are a batch dimension; restart 0 equals the ``n_init=1`` run).
        seed: seed of the default generator (and of cuML).
        backend: "auto" (the C kernel for CPU tensors when a compiler is there, else torch),
            "torch" (any device), "native" (the C kernel, CPU only; computes in float32) or
            "cuml" (RAPIDS, optional).
        init: optional (B, k, D) initial centres instead of k-means++ (torch backend only;
            then ``n_init`` has to be 1).
        prepared: ``prepare_points(x)`` of these very points (in the dtype k-means computes
            in), to share that work between several k; used by the torch backend with
            ``n_init=1`` and ignored otherwise.
        cache: optional ``SeedingCache`` that keeps k-means++'s random numbers for later
            calls with the same seed (same result, less drawing); None draws them.
        check_every: the torch backend reads "has every item converged?" on the host once every
            this many Lloyd iterations (the loop's only host synchronisation); the results do not
            depend on it, only the number of idle iterations (at most ``check_every - 1``) does.

    Returns:
        labels (B, N) long in [0, k), centers (B, k, D) float.
    """
    check_tensor(x, "x", 3, floating=True)
    b, n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"`k` has to lie in [1, N] = [1, {n}] but is {k}")
    _check_settings(max_iter, tol, check_every)
    if n_init < 1:
        raise ValueError(f"`n_init` has to be at least 1 but is {n_init}")
    if init is not None:
        check_tensor(init, "init", 3, floating=True, batch=b)
        if tuple(init.shape[1:]) != (k, d) or n_init != 1 or backend == "cuml":
            raise ValueError(
                f"`init` has to have shape (B, k, D) = {(b, k, d)} with n_init=1 and a backend other than 'cuml' "
                f"but has shape {tuple(init.shape)} (n_init={n_init}, backend={backend!r})"
            )
    impl = resolve("kmeans", backend, x, fits=x.dtype != torch.float64)  # float64 stays on the torch path
    if impl == "cuml":
        return rapids.kmeans_cuml(x, k, max_iter, tol, seed, n_init)
    use_native = impl == "native"
    generator = local_generator(generator, seed, x.device)
    work = x.float() if use_native or x.dtype != torch.float64 else x  # the kernel computes in float32
    if n_init > 1:
        work = work.repeat_interleave(n_init, dim=0)  # (B*n_init, N, D), restarts of one item adjacent
    if n_init > 1 or prepared is None or prepared.x.shape != work.shape or prepared.x.dtype != work.dtype:
        prepared = None  # restarts repeat the points: prepare them afresh
    if use_native:
        if prepared is not None and prepared.xt is None and d <= NARROW_D:
            prepared = None  # narrow points need the transpose
        labels, centers, inertia = _kmeans_native(work, k, max_iter, tol, generator, n_init, init, prepared, cache=cache)
    else:
        if prepared is not None and (prepared.xt is None or prepared.x_sq is None):
            prepared = None  # the torch E-step needs the transpose and the norms
        labels, centers, inertia = _kmeans_torch(work, k, max_iter, tol, generator, n_init, init, prepared, cache,
                                                 check_every)
    if n_init > 1:
        best = inertia.view(b, n_init).argmin(dim=1) + torch.arange(b, device=x.device) * n_init  # (B,)
        labels, centers = labels[best], centers[best]
    return labels, centers


def kmeans_many(
    x: Tensor,
    ks,
    *,
    max_iter: int = 300,
    tol: float = 1e-4,
    generators: Optional[list] = None,
    seed: int = 0,
    backend: str = "auto",
    prepared: Optional[PreparedPoints] = None,
    cache: Optional[SeedingCache] = None,
    check_every: int = 4,
) -> list:
    """``kmeans(x, k, ...)`` for every k in ``ks`` (one initialisation each), same results.

    The torch backend runs the Lloyd iterations of all of them in one loop (centres padded to
    the largest k): an iteration costs one E-step for every k, and the loop runs as long as
    the slowest k-means, not as long as all of them one after the other. Other backends run
    them one by one.

    Args:
        x: (B, N, D) points; ks: the cluster counts (each in [1, N]).
        generators: one k-means++ generator per k (default: each seeded with ``seed``, as a
            fresh ``kmeans`` call would be).
        the rest: as :func:`kmeans`.

    Returns:
        labels (B, N) long per k, in the order of ``ks``.
    """
    check_tensor(x, "x", 3, floating=True)
    ks = tuple(ks)
    if not ks:
        raise ValueError("`ks` has to hold at least one cluster count but is empty")
    if generators is not None and len(generators) != len(ks):
        raise ValueError(f"`generators` has to hold one generator per k ({len(ks)}) but holds {len(generators)}")
    n = x.shape[1]
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"every k in `ks` has to be an integer in [1, N] = [1, {n}] but one is {k!r}")
    gens = list(generators) if generators is not None else [local_generator(None, seed, x.device) for _ in ks]
    impl = resolve("kmeans", backend, x, fits=x.dtype != torch.float64)
    if impl != "torch" or len(ks) == 1:
        return [kmeans(x, k, max_iter=max_iter, tol=tol, generator=g, seed=seed, backend=backend,
                       prepared=prepared, cache=cache, check_every=check_every)[0] for k, g in zip(ks, gens)]
    _check_settings(max_iter, tol, check_every)
    work = x if x.dtype == torch.float64 else x.float()
    if (prepared is None or prepared.x.shape != work.shape or prepared.x.dtype != work.dtype
            or prepared.xt is None or prepared.x_sq is None):
        prepared = prepare_points(work)
    return _kmeans_torch_many(prepared, ks, gens, max_iter, tol, cache, check_every)
