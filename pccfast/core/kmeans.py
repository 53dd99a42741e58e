"""Batched k-means (scikit-learn's Lloyd with greedy k-means++), one problem per batch item.

Reference settings (section 2): k-means++ init, Lloyd, ``tol=1e-4`` relative to the mean
per-feature variance, at most 300 iterations, one initialisation, fixed seed. Distances use
``||x||^2 - 2 x.c + ||c||^2`` with a batched matmul; nothing is (N x N). k-means++ draws its
D^2-weighted candidates by an exponential race rather than scikit-learn's inverse CDF: the
same distribution, but a few slightly changed points (an image generated in another batch)
do not change the seeds.

Backends: ``"torch"`` (any device) and ``"cuml"`` (RAPIDS cuML, optional, one call per item).
"""
from __future__ import annotations

import ctypes
import importlib.util
import math
from typing import Optional

import torch
from torch import Tensor

from pccfast.core.checks import check_tensor, local_generator

__all__ = ["kmeans", "kmeans_plusplus", "kmeans_inertia", "assign", "prepare_points", "resolve_backend", "BACKENDS",
           "NARROW_D"]


_SLOTS = 8  # partial sums per cluster and feature in the M-step for narrow points


def _chunk(n: int, k: int, b: int, device: torch.device) -> int:
    """Points per E-step chunk. GPUs take all; on the CPU the (B, k, chunk) scores are kept to
    about 4M values (16 MB): large enough that each op amortises waking the thread pool
    (with OMP_WAIT_POLICY=PASSIVE, chunks of 13k points made the E-step 2x slower), small
    enough to bound the memory of a batch."""
    if device.type != "cpu":
        return n
    return max(1024, (1 << 22) // max(k * b, 1))


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


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, idx[b, j]] for all b, j. x: (B, N, D), idx: (B, m) -> (B, m, D)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _stream_seeds(generator: torch.Generator, streams: int) -> list[int]:
    """One seed per random stream, drawn from ``generator`` one stream at a time, so stream 0
    is the same whatever the number of streams (restart 0 equals the ``n_init=1`` run)."""
    return [int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)) for _ in range(streams)]


def _random(g: torch.Generator, shape: tuple[int, ...], kind: str) -> Tensor:
    """Random numbers of one stream on its generator's device, float64 (53-bit resolution, so
    the small exponentials that win a race over many points are not quantised).

    kind "uniform" ([0, 1)) or "exponential" (rate 1, > 0) -> ``shape``
    """
    r = torch.empty(shape, dtype=torch.float64, device=g.device).uniform_(generator=g)  # [0, 1)
    if kind == "exponential":  # -log(1 - u) (3x faster than exponential_ on the CPU), kept
        r = r.neg_().log1p_().neg_().clamp_min_(torch.finfo(torch.float64).tiny)  # > 0: w / E is never NaN
    return r


class _RaceStream:
    """The k-means++ random numbers of one stream, remembered across calls.

    They do not depend on the data: a stream seeded ``seed`` draws one uniform for the first
    centre, then ``(trials, n)`` exponentials per later step, whatever the points. Drawing
    them costs more than the rest of the seeding on the CPU (float64 Mersenne Twister and a
    log per point), and every image of a run uses the same seed, so the first call keeps, per
    step and trial, the generator state and the ``keep`` smallest exponentials (with the
    smallest one left out, ``tau``). A race whose best kept key ``w_i / E_i`` beats
    ``max(w) / tau``, the most any other point can reach, is decided by the kept points
    alone (exactly: rounding is monotone); otherwise the step's numbers are drawn again
    from the saved state. Results are identical to drawing every time.
    """

    _cache: "dict[tuple, dict]" = {}  # (seed, n, trials, steps, generator device, device) -> entry
    _max_entries = 8

    def __init__(self, seed: int, n: int, trials: int, steps: int, gen_device: torch.device,
                 device: torch.device) -> None:
        self.key = (seed, n, trials, steps, str(gen_device), str(device))
        self.gen_device = gen_device
        self.shape, self.device = (trials, n), device
        self.keep = n if n <= 256 else max(256, n // 64)  # kept exponentials per trial
        self.entry = self._cache.get(self.key)
        self.gen = None
        if self.entry is None:  # first call with this seed: draw, and remember
            self.gen = torch.Generator(device=gen_device).manual_seed(seed)
            self.entry = {"first": _random(self.gen, (1,), "uniform").to(device), "states": [], "idx": [],
                          "val": [], "tau": [], "steps": steps}

    def first(self) -> Tensor:
        """(1,) float64 uniform of the first centre."""
        return self.entry["first"]

    def kept(self, step: int) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """Kept (idx (T, m) ascending, E (T, m), tau (T,)) of a step, or None on the first call."""
        if self.gen is not None:
            return None
        return self.entry["idx"][step], self.entry["val"][step], self.entry["tau"][step]

    def full(self, step: int) -> Tensor:
        """All (T, n) exponentials of a step (drawn now; recorded on the first call)."""
        if self.gen is None:  # drawn again from the saved state
            g = torch.Generator(device=self.gen_device)
            g.set_state(self.entry["states"][step])
            return _random(g, self.shape, "exponential").to(self.device)
        self.entry["states"].append(self.gen.get_state())
        race = _random(self.gen, self.shape, "exponential").to(self.device)  # (T, n)
        if self.keep >= self.shape[1]:
            idx = torch.arange(self.shape[1], device=self.device).expand(self.shape).contiguous()
            tau = torch.full(self.shape[:1], math.inf, dtype=torch.float64, device=self.device)
        else:
            low = race.topk(self.keep + 1, dim=-1, largest=False)  # (T, keep + 1) smallest first
            idx, tau = low.indices[:, :-1].sort(dim=-1).values, low.values[:, -1]  # (T, keep), (T,)
        self.entry["idx"].append(idx)
        self.entry["val"].append(torch.gather(race, 1, idx))
        self.entry["tau"].append(tau)
        if len(self.entry["idx"]) == self.entry["steps"]:  # complete: remember it
            if len(self._cache) >= self._max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[self.key] = self.entry
        return race


def _race(streams: list[_RaceStream], step: int, weights: Tensor) -> Tensor:
    """D^2 candidates of one k-means++ step, item b taking stream ``b % streams``.

    weights: (B, N) -> (B, T) long, the indices ``_d2_sample`` gives with the step's numbers
    """
    b = weights.shape[0]
    kept = [s.kept(step) for s in streams]
    if all(k is not None for k in kept):
        pick = torch.arange(b, device=weights.device) % len(streams)  # (B,) stream of each item
        if len(streams) == 1:  # every item the same numbers: a view, no copy
            idx, val, tau = (parts[0].expand(b, *parts[0].shape) for parts in zip(*kept))
        else:
            idx, val, tau = (torch.stack(parts)[pick] for parts in zip(*kept))  # (B, T, m), (B, T, m), (B, T)
        t, m = idx.shape[1:]
        keys = weights.gather(1, idx.reshape(b, t * m)).double().view(b, t, m) / val  # (B, T, m)
        best, arg = keys.max(dim=-1)  # (B, T); first max = lowest index, as the full race
        bound = weights.amax(dim=-1).double()[:, None] / tau  # (B, T) the best any other point reaches
        if bool((best > bound).all()):
            return torch.gather(idx, 2, arg[..., None]).squeeze(-1)  # (B, T)
    race = torch.stack([s.full(step) for s in streams])  # (streams, T, N)
    race = race.expand(b, *race.shape[1:]) if len(streams) == 1 else race[
        torch.arange(b, device=weights.device) % len(streams)]  # (B, T, N)
    return _d2_sample(weights, race)


def _d2_sample(weights: Tensor, race: Tensor) -> Tensor:
    """Indices drawn with probability proportional to ``weights``, by an exponential race.

    Each draw t takes argmax_i weights_i / E_ti with E_ti ~ Exp(1) i.i.d.: the minimum of
    independent exponentials of rates w_i is attained at i with probability w_i / sum(w), the
    distribution scikit-learn samples with ``searchsorted(cumsum(w), u * sum(w))``. Unlike
    inverse-CDF sampling, a change of a few weights moves the winner only if it touches the
    winning keys, instead of shifting the cumulative sum under every later index; so inputs
    that differ by float noise (e.g. an image generated in another batch) get the same
    seeds. Zero weights never win unless all are zero (then index 0).

    weights: (B, N) >= 0, race: (B, T, N) exponential -> (B, T) long
    """
    keys = weights.double()[:, None, :] / race  # (B, T, N); race > 0, so zero weights give 0
    return keys.argmax(dim=-1)


def _race_setup(x: Tensor, k: int, generator: torch.Generator, streams: int) -> tuple[list, Tensor]:
    """Random streams of k-means++ and each item's first centre. x: (B, N, D) -> races, (B, 1) long"""
    b, n, _ = x.shape
    trials = 2 + int(math.log(k))
    races = [_RaceStream(seed, n, trials, k - 1, generator.device, x.device)
             for seed in _stream_seeds(generator, streams)]
    first = torch.stack([r.first() for r in races])  # (streams, 1) float64 uniforms
    first = first.expand(b, 1) if streams == 1 else first[torch.arange(b, device=x.device) % streams]
    return races, (first * n).long().clamp_(max=n - 1)  # (B, 1) uniform index


def _native_lib():
    """The compiled ``kernels/kmeans.c`` with its argument types (raises NativeUnavailable)."""
    from pccfast.backends import native

    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    return native.typed("kmeans", {
        "pcc_kmeans_lloyd": ([vp, i64, i64, i64, i64, vp, vp, vp, vp, i64, i32, i32, vp], ctypes.c_int),
        "pcc_kmeanspp_step": ([vp, i64, i64, i64, vp, i64, vp, vp, vp, i32], None),
    })


NARROW_D = 16  # kernels/kmeans.c NARROW_D: up to this width the kernel takes points transposed


def _kmeanspp_native(x: Tensor, k: int, generator: torch.Generator, streams: int = 1,
                     xt: Optional[Tensor] = None) -> Tensor:
    """``kmeans_plusplus`` with the distance and potential work in the C kernel (same draws,
    same greedy choice; squared distances summed directly instead of by expansion).

    x: (B, N, D) float32 contiguous CPU; xt: its (B, D, N) contiguous transpose, needed when
    D <= 16 -> (B, k, D) initial centres (rows of x)
    """
    from pccfast.backends.native import num_threads, ptr

    lib = _native_lib()
    b, n, d = x.shape
    pts = _native_points(x, xt)
    races, first = _race_setup(x, k, generator, streams)
    cand_x = _rows(x, first).contiguous()  # (B, 1, D)
    centers = [cand_x]
    closest = torch.full((b, n), math.inf, dtype=torch.float32)  # (B, N)
    chosen = torch.empty(b, dtype=torch.int64)  # (B,)
    nt = num_threads()
    lib.pcc_kmeanspp_step(ptr(pts), b, n, d, ptr(cand_x), 1, ptr(closest), ptr(chosen), None, nt)
    for step in range(k - 1):
        cand = _race(races, step, closest)  # (B, T)
        cand_x = _rows(x, cand).contiguous()  # (B, T, D)
        lib.pcc_kmeanspp_step(ptr(pts), b, n, d, ptr(cand_x), cand.shape[1], ptr(closest), ptr(chosen), None, nt)
        centers.append(torch.gather(cand_x, 1, chosen[:, None, None].expand(-1, 1, d)))  # (B, 1, D)
    return torch.cat(centers, dim=1)  # (B, k, D)


def _native_points(x: Tensor, xt: Optional[Tensor]) -> Tensor:
    """The layout the kernel takes: (B, D, N) for narrow points, else x (B, N, D)."""
    if x.shape[-1] > NARROW_D:
        return x
    return xt if xt is not None else x.transpose(1, 2).contiguous()


def _kmeans_native(
    x: Tensor, k: int, max_iter: int, tol: float, generator: torch.Generator, streams: int = 1,
    init: Optional[Tensor] = None, prepared: Optional[tuple] = None, prune: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The C kernel: k-means++ then Lloyd with exact Hamerly/Elkan pruning (``kernels/kmeans.c``).

    x: (B, N, D) float32 CPU, init: optional (B, k, D), prepared: optional
    ``prepare_points(x)`` (float32) -> labels (B, N), centers (B, k, D), inertia (B,)
    """
    from pccfast.backends.native import num_threads, ptr

    lib = _native_lib()
    if prepared is None:
        prepared = prepare_points(x, transpose=x.shape[-1] <= NARROW_D, norms=False)
    xc, mean, xt, _, var = prepared  # centred (B, N, D), (B, 1, D), (B, D, N) or None, _, (B,)
    b, n, d = xc.shape
    tol_abs = (tol * var.double()).contiguous()  # (B,) float64
    if init is None:
        centers = _kmeanspp_native(xc, k, generator, streams, xt)
    else:
        centers = init.to(torch.float32) - mean
    centers = centers.contiguous().clone()  # (B, k, D) updated in place
    labels = torch.empty(b, n, dtype=torch.int64)
    min_dist = torch.empty(b, n, dtype=torch.float32)
    n_iter = torch.empty(b, dtype=torch.int64)
    rc = lib.pcc_kmeans_lloyd(ptr(_native_points(xc, xt)), b, n, d, k, ptr(centers), ptr(labels), ptr(min_dist),
                              ptr(tol_abs), max_iter, int(prune), num_threads(), ptr(n_iter))
    if rc != 0:
        raise MemoryError(f"native k-means could not allocate its work space (B={b}, N={n}, D={d}, k={k})")
    return labels, centers + mean, min_dist.sum(-1)


def kmeans_plusplus(
    x: Tensor,
    k: int,
    generator: torch.Generator,
    x_sq: Optional[Tensor] = None,
    streams: int = 1,
    xt: Optional[Tensor] = None,
) -> Tensor:
    """Greedy k-means++ seeding (scikit-learn's: 2 + floor(ln k) candidates per step).

    The first centre is a uniform random point; every later step draws the candidates with
    probability proportional to the squared distance to the nearest centre so far (D^2
    sampling, by an exponential race, see ``_d2_sample``) and keeps the candidate that
    lowers the potential most. ``streams`` random streams are used and batch item b takes
    stream ``b % streams``: with one stream every item is seeded exactly as if it were alone,
    so results do not depend on how images are batched.

    Args:
        x: (B, N, D) points; k: number of centres; generator: local generator.
        x_sq: optional (B, N) squared norms; xt: optional (B, D, N) contiguous transpose of x.
        streams: number of distinct random streams (``n_init`` restarts use one each).

    Returns:
        (B, k, D) initial centres (rows of x).
    """
    b, n, d = x.shape
    if x_sq is None:
        x_sq = (x * x).sum(-1)
    if xt is None:
        xt = x.transpose(1, 2).contiguous()  # (B, D, N)
    races, first = _race_setup(x, k, generator, streams)
    centers = [_rows(x, first)]  # each (B, 1, D)
    closest = _assign_t(xt, centers[0], x_sq)[1]  # (B, N) squared distance to the nearest centre
    for step in range(k - 1):
        cand = _race(races, step, closest)  # (B, T)
        cand_x = _rows(x, cand)  # (B, T, D)
        c_sq = (cand_x * cand_x).sum(-1)[..., None]  # (B, T, 1)
        dist = torch.baddbmm(c_sq, cand_x, xt, alpha=-2.0).add_(x_sq[:, None, :]).clamp_min_(0)  # (B, T, N)
        new_closest = torch.minimum(closest[:, None, :], dist)  # (B, T, N)
        best = new_closest.sum(-1).argmin(dim=-1)  # (B,)
        closest = new_closest.gather(1, best[:, None, None].expand(-1, 1, n)).squeeze(1)  # (B, N)
        centers.append(torch.gather(cand_x, 1, best[:, None, None].expand(-1, 1, d)))  # (B, 1, D)
    return torch.cat(centers, dim=1)  # (B, k, D)


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


def prepare_points(x: Tensor, transpose: bool = True, norms: bool = True) -> tuple:
    """What every k-means of the same points shares: compute it once and pass it to
    ``kmeans(..., prepared=)`` for several k (the blocky mask clusters one feature tensor
    with k = 4, 7 and 10).

    Points stored feature-major (``x`` a transposed view of a contiguous (B, D, N) tensor,
    as ``refine.refine_points`` returns) are centred in that layout: the transpose is then
    free and the centred x is again a transposed view.

    x: (B, N, D) float -> centred x (B, N, D), mean (B, 1, D), centred x^T (B, D, N)
    contiguous (None unless ``transpose`` or free; the torch backend and narrow points in
    the C kernel need it), squared norms (B, N) (None unless ``norms``; the torch backend
    needs them), mean feature variance (B,)
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
    return x, mean, xt, x_sq, var


def _kmeans_torch(
    x: Tensor, k: int, max_iter: int, tol: float, generator: torch.Generator, streams: int = 1,
    init: Optional[Tensor] = None, prepared: Optional[tuple] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """x: (B, N, D) float, init: optional (B, k, D) -> labels (B, N), centers (B, k, D), inertia (B,)."""
    x, mean, xt, x_sq, var = prepared if prepared is not None else prepare_points(x)
    tol_abs = tol * var  # (B,)
    if init is None:
        centers = kmeans_plusplus(x, k, generator, x_sq, streams, xt)  # (B, k, D)
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


def _kmeans_cuml(
    x: Tensor, k: int, max_iter: int, tol: float, seed: int, n_init: int
) -> tuple[Tensor, Tensor]:
    """One cuML KMeans per batch item (its ``tol`` is cuML's own criterion)."""
    if importlib.util.find_spec("cuml") is None:
        raise ImportError(
            "kmeans backend 'cuml' needs RAPIDS cuML, which is not installed: "
            "pip install cuml-cu12 (CUDA 12; see https://docs.rapids.ai/install), "
            "or use backend='torch'"
        )
    from cuml.cluster import KMeans as CuKMeans  # noqa: WPS433 (optional backend)

    labels, centers = [], []
    for item in x.float().contiguous():  # (N, D) per item; cuML has no batch dimension
        data = item
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


BACKENDS = ("auto", "torch", "native", "cuml")


def resolve_backend(backend: str, x: Tensor) -> str:
    """The implementation ``backend`` stands for with points ``x``: "auto" is "native" (the C
    kernel) for float32 CPU tensors when it builds, else "torch"; "native" needs a CPU tensor
    and the kernel (``NativeUnavailable`` otherwise); others are themselves."""
    from pccfast.backends.native import resolve

    return resolve(backend, x, "kmeans", "kmeans", "backend", fits=x.dtype != torch.float64)


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
    prepared: Optional[tuple] = None,
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
    if backend == "cuml":
        return _kmeans_cuml(x, k, max_iter, tol, seed, n_init)
    if backend not in BACKENDS:
        raise ValueError(f"`backend` has to be one of {', '.join(map(repr, BACKENDS))} but is {backend!r}")
    use_native = resolve_backend(backend, x) == "native"
    gen = local_generator(generator, seed, x.device)
    work = x.float() if use_native or x.dtype != torch.float64 else x  # the kernel computes in float32
    if n_init > 1:
        work = work.repeat_interleave(n_init, dim=0)  # (B*n_init, N, D), restarts of one item adjacent
    if n_init > 1 or prepared is None or prepared[0].shape != work.shape or prepared[0].dtype != work.dtype:
        prepared = None  # restarts repeat the points: prepare them afresh
    if use_native:
        if prepared is not None and prepared[2] is None and d <= NARROW_D:
            prepared = None  # narrow points need the transpose
        labels, centers, inertia = _kmeans_native(work, k, max_iter, tol, gen, n_init, init, prepared)
    else:
        if prepared is not None and prepared[2] is None:
            prepared = None  # the torch E-step needs the transpose
        labels, centers, inertia = _kmeans_torch(work, k, max_iter, tol, gen, n_init, init, prepared)
    if n_init > 1:
        best = inertia.view(b, n_init).argmin(dim=1) + torch.arange(b, device=x.device) * n_init  # (B,)
        labels, centers = labels[best], centers[best]
    return labels, centers
