"""Batched k-means (scikit-learn's Lloyd with greedy k-means++), one problem per batch item.

Reference settings (section 2): k-means++ init, Lloyd, ``tol=1e-4`` relative to the mean
per-feature variance, at most 300 iterations, one initialisation, fixed seed. Distances use
``||x||^2 - 2 x.c + ||c||^2`` with a batched matmul; nothing is (N x N). The seeding is
``pccfast.core.seeding`` (k-means++ by an exponential race; its random numbers can be kept
in a caller's ``SeedingCache``).

Backends (``pccfast.backends.OPERATIONS["kmeans"]``): ``"torch"`` (any device, this
module's Lloyd loop), ``"native"`` (the C kernel ``kernels/kmeans.c``, CPU), ``"cuml"``
(RAPIDS cuML, optional, one call per item) and ``"auto"``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from pccfast.backends import kernels, rapids, resolve
from pccfast.backends.kernels import NARROW_D
from pccfast.core.checks import check_tensor, local_generator
from pccfast.core.seeding import SeedingCache, _chunk, _rows, kmeans_plusplus, kmeans_plusplus_native

__all__ = ["kmeans", "kmeans_plusplus", "kmeans_inertia", "assign", "prepare_points", "PreparedPoints",
           "SeedingCache", "NARROW_D"]


_SLOTS = 8  # partial sums per cluster and feature in the M-step for narrow points


def _argmin_rows(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum over dim 1 and its first index. scores: (B, k, n) -> (B, n), (B, n) long.

    Same result as ``scores.min(1)`` (first index on ties) but vectorised along the contiguous
    point axis: ``amin`` then the largest of (k - j) over the minimal rows j.
    """
    k = scores.shape[1]
    best = scores.amin(dim=1, keepdim=True)  # (B, 1, n)
    wdtype = torch.uint8 if k < 256 else torch.int32
    weight = (k - torch.arange(k, device=scores.device)).to(wdtype)[None, :, None]  # (1, k, 1)
    first = k - ((scores == best) * weight).amax(dim=1).long()  # (B, n)
    return best[:, 0], first


def _assign_t(xt: Tensor, centers: Tensor, x_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centres with points in columns.

    xt: (B, D, N) contiguous, centers: (B, k, D), x_sq: (B, N) -> labels (B, N), sq. distance (B, N)
    """
    b, _, n = xt.shape
    k = centers.shape[1]
    c_sq = (centers * centers).sum(-1)[..., None]  # (B, k, 1)
    step = _chunk(n, k, b, xt.device)
    labels, dist = [], []
    for start in range(0, n, step):  # chunks along the points keep the scores small
        scores = torch.baddbmm(c_sq, centers, xt[:, :, start:start + step], alpha=-2.0)  # (B, k, n')
        best, idx = _argmin_rows(scores)
        labels.append(idx)
        dist.append(best)
    labels_t = torch.cat(labels, dim=1) if len(labels) > 1 else labels[0]  # (B, N)
    best_t = torch.cat(dist, dim=1) if len(dist) > 1 else dist[0]  # (B, N)
    return labels_t, (best_t + x_sq).clamp_min_(0)


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


def _update(x: Tensor, labels: Tensor, min_dist: Tensor, old: Tensor, k: int, xt: Optional[Tensor] = None) -> Tensor:
    """Lloyd M-step with scikit-learn's empty-cluster relocation.

    An empty cluster takes one of the points farthest from their centres (the j-th empty
    cluster of an item takes its j-th farthest point), which leaves its old cluster.

    x: (B, N, D), labels: (B, N), min_dist: (B, N), old: (B, k, D), xt: optional (B, D, N)
    contiguous transpose of x -> (B, k, D)
    """
    b, n, d = x.shape
    flat = (labels + torch.arange(b, device=x.device)[:, None] * k).reshape(-1)  # (B*N,) item-major ids
    if d <= 16:  # few long rows: sum along the contiguous point axis of x^T
        if xt is None:
            xt = x.transpose(1, 2).contiguous()  # (B, D, N)
        # point j adds into slot j % S of its cluster: consecutive points never wait on one
        # accumulator (3x faster on the CPU), and S partial sums lose less to float32 rounding
        # than one running sum
        slot = (torch.arange(n, device=x.device) % _SLOTS) * k  # (N,)
        idx = (labels + slot)[:, None, :].expand(b, d, n)  # (B, D, N) in [0, S*k)
        sums = torch.zeros(b, d, _SLOTS * k, device=x.device, dtype=x.dtype).scatter_add_(2, idx, xt)
        sums = sums.view(b, d, _SLOTS, k).sum(2).transpose(1, 2)  # (B, k, D)
    else:  # wide points: whole rows at once
        sums = torch.zeros(b * k, d, device=x.device, dtype=x.dtype).index_add_(0, flat, x.reshape(-1, d))
        sums = sums.view(b, k, d)  # (B, k, D)
    counts = torch.bincount(flat, minlength=b * k).view(b, k).to(x.dtype)  # (B, k)
    empty = counts == 0  # (B, k)
    if bool(empty.any()):
        far = min_dist.topk(k, dim=-1).indices  # (B, k) farthest points first
        rank = (torch.cumsum(empty.long(), dim=-1) - 1).clamp_min(0)  # (B, k)
        point = torch.gather(far, 1, rank)  # (B, k): the point an empty cluster takes
        px = _rows(x, point) * empty[..., None]  # (B, k, D), zero rows for non-empty clusters
        src = torch.gather(labels, 1, point)  # (B, k) the cluster that point leaves
        sums = sums.scatter_add(1, src[..., None].expand(-1, -1, d), -px)
        counts = counts.scatter_add(1, src, -empty.to(counts.dtype))
        sums = torch.where(empty[..., None], px, sums)
        counts = torch.where(empty, torch.ones_like(counts), counts)
    new = sums / counts.clamp_min(1)[..., None]  # (B, k, D)
    return torch.where((counts > 0)[..., None], new, old)


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
) -> tuple[Tensor, Tensor, Tensor]:
    """The torch path: k-means++ then Lloyd, converged items leaving the batch.

    x: (B, N, D) float, init: optional (B, k, D), prepared: optional ``prepare_points(x)``
    with the transpose and norms -> labels (B, N), centers (B, k, D), inertia (B,)
    """
    x, mean, xt, x_sq, var = prepared if prepared is not None else prepare_points(x)
    tol_abs = tol * var  # (B,)
    if init is None:
        centers = kmeans_plusplus(x, k, generator, x_sq, streams, xt, cache)  # (B, k, D)
    else:
        centers = init.to(x.dtype) - mean
    # Lloyd; items that converged leave the batch, so a batch costs the sum of its items'
    # iterations, not B times the slowest one
    final = centers.clone()  # (B, k, D) converged centres land here
    act = torch.arange(x.shape[0], device=x.device)  # (A,) items still running
    xa, xta, sqa, tola, ca, prev = x, xt, x_sq, tol_abs, centers, None
    for it in range(max_iter):
        labels, min_dist = _assign_t(xta, ca, sqa)  # (A, N), (A, N)
        new = _update(xa, labels, min_dist, ca, k, xta)  # (A, k, D)
        shift = ((new - ca) ** 2).sum(dim=(1, 2))  # (A,)
        # strict convergence (labels unchanged) leaves `new` equal to `ca`
        done = shift <= tola
        if prev is not None:
            done |= (labels == prev).all(-1)
        ca, prev = new, labels
        if it == max_iter - 1:
            done = torch.ones_like(done)
        if bool(done.any()):
            final[act[done]] = ca[done]
            keep = ~done
            if not bool(keep.any()):
                break
            act, xa, xta, sqa, tola = act[keep], xa[keep], xta[keep], sqa[keep], tola[keep]
            ca, prev = ca[keep], prev[keep]
    centers = final
    labels, min_dist = _assign_t(xt, centers, x_sq)  # final E-step, as scikit-learn
    return labels, centers + mean, min_dist.sum(-1)


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
) -> tuple[Tensor, Tensor]:
    """k-means of every batch item: greedy k-means++ then Lloyd (scikit-learn 1.4 semantics).

    Convergence per item: labels unchanged, or the squared centre shift summed over centres
    at most ``tol * mean(var(x, dim=N))``; items that converged leave the batch.

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

    Returns:
        labels (B, N) long in [0, k), centers (B, k, D) float.
    """
    check_tensor(x, "x", 3, floating=True)
    b, n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"`k` has to lie in [1, N] = [1, {n}] but is {k}")
    if max_iter < 1:
        raise ValueError(f"`max_iter` has to be at least 1 but is {max_iter}")
    if n_init < 1:
        raise ValueError(f"`n_init` has to be at least 1 but is {n_init}")
    if tol < 0:
        raise ValueError(f"`tol` has to be >= 0 but is {tol}")
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
        labels, centers, inertia = _kmeans_torch(work, k, max_iter, tol, generator, n_init, init, prepared, cache)
    if n_init > 1:
        best = inertia.view(b, n_init).argmin(dim=1) + torch.arange(b, device=x.device) * n_init  # (B,)
        labels, centers = labels[best], centers[best]
    return labels, centers
