"""Greedy k-means++ seeding (scikit-learn's), batched, with D^2 draws by an exponential race.

Every later step draws ``2 + floor(ln k)`` candidates with probability proportional to the
squared distance to the nearest centre so far and keeps the one that lowers the potential
most. The draws are an exponential race (``_d2_sample``) rather than scikit-learn's inverse
CDF: the same distribution, but a few slightly changed points (an image generated in another
batch) do not change the seeds.

The race's random numbers do not depend on the data, and drawing them (float64 and a log per
point) costs more than the rest of the seeding on the CPU. A ``SeedingCache``, owned by the
caller and passed in, keeps them between calls with the same seed; results are identical
with and without one.

``kmeans_plusplus`` is the torch path (any device); ``kmeans_plusplus_native`` makes the
same draws and has the C kernel do the distance and potential work.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from pccfast.backends import kernels
from pccfast.core.checks import cpu_tuned

__all__ = ["SeedingCache", "kmeans_plusplus", "kmeans_plusplus_native"]


class SeedingCache:
    """The k-means++ random numbers of recent streams, kept for later calls with the same seed.

    A stream seeded ``seed`` over ``n`` points with ``trials`` candidates per step draws one
    uniform for the first centre, then ``(trials, n)`` exponentials per step, whatever the
    points; every image of a run uses the same seed. The cache keeps, per stream, the
    generator state before each step and the ``keep`` smallest exponentials of each trial
    (with the next smallest, ``tau``). A race whose best kept key ``w_i / E_i`` beats
    ``max(w) / tau``, the most any other point can reach, is decided by the kept points alone
    (exactly: rounding is monotone); otherwise that step's numbers are drawn again from its
    saved state. A k that needs more steps than a stream holds continues the stream (k = 4
    and k = 7 have the same trials, so k = 7 reuses k = 4's steps).

    Not thread-safe: one cache per thread or run. Holds at most ``max_entries`` streams,
    dropping the oldest.
    """

    def __init__(self, max_entries: int = 8) -> None:
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"`max_entries` has to be an integer of at least 1 but is {max_entries!r}")
        self.max_entries = max_entries
        self._streams: dict[tuple, _Record] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def clear(self) -> None:
        """Forget every stream."""
        self._streams.clear()

    def __repr__(self) -> str:
        return f"SeedingCache(max_entries={self.max_entries}, streams={len(self)})"

    def _get(self, key: tuple) -> Optional["_Record"]:
        return self._streams.get(key)

    def _put(self, key: tuple, record: "_Record") -> None:
        if len(self._streams) >= self.max_entries:
            self._streams.pop(next(iter(self._streams)))  # the oldest
        self._streams[key] = record


def _random(g: torch.Generator, shape: tuple[int, ...], kind: str) -> Tensor:
    """Random numbers of one stream on its generator's device, float64 (53-bit resolution, so
    the small exponentials that win a race over many points are not quantised).

    kind "uniform" ([0, 1)) or "exponential" (rate 1, > 0) -> ``shape``
    """
    r = torch.empty(shape, dtype=torch.float64, device=g.device).uniform_(generator=g)  # [0, 1)
    if kind == "exponential":  # -log(1 - u) (3x faster than exponential_ on the CPU), kept
        r = r.neg_().log1p_().neg_().clamp_min_(torch.finfo(torch.float64).tiny)  # > 0: w / E is never NaN
    return r


class _Record:
    """One stream's numbers: the first uniform, and per recorded step the generator state
    before it, the kept indices (T, m) ascending, their exponentials (T, m) and tau (T,).
    ``generator`` stands after the last drawn step (in a cache, every drawn step is recorded)."""

    def __init__(self, seed: int, gen_device: torch.device, device: torch.device,
                 ahead: Optional[tuple[int, int, int]] = None) -> None:
        self.generator = torch.Generator(device=gen_device).manual_seed(seed)
        self.states: list[Tensor] = []
        self.idx: list[Tensor] = []
        self.val: list[Tensor] = []
        self.tau: list[Tensor] = []
        self.ahead: Optional[Tensor] = None  # (S, T, N) exponentials of steps ahead_from.., on ``device``
        self.ahead_from = 0
        self.plan = ahead  # (steps, trials, n) to draw ahead, or None
        if ahead is None:
            self.first = _random(self.generator, (1,), "uniform").to(device)  # (1,) float64
            self.drawn = 0  # steps ``generator`` has drawn
            return
        self.drawn = 0
        self.first = self._block(device, with_first=True)

    def _block(self, device: torch.device, with_first: bool = False) -> Optional[Tensor]:
        """Draw the next steps' numbers at once, at most ``_AHEAD`` numbers (and before them
        the first uniform), the same numbers as drawn one step at a time (the generator fills
        in order), moved to the device in one copy. Returns the first uniform (1,) or None."""
        steps, trials, n = self.plan
        count = min(steps - self.drawn, max(1, _AHEAD // (trials * n)))  # steps in this block
        head = 1 if with_first else 0
        numbers = _random(self.generator, (head + count * trials * n,), "uniform")  # (head + S*T*N,)
        numbers[head:].neg_().log1p_().neg_().clamp_min_(torch.finfo(torch.float64).tiny)  # as _random's exponentials
        numbers = numbers.to(device)  # one copy
        self.ahead, self.ahead_from = numbers[head:].view(count, trials, n), self.drawn
        self.drawn += count
        return numbers[:1] if with_first else None

    def drawn_ahead(self, step: int, device: torch.device) -> Optional[Tensor]:
        """Step ``step``'s (T, N) exponentials when this record draws ahead, else None."""
        if self.plan is None or step >= self.plan[0]:
            return None
        if step >= self.ahead_from + self.ahead.shape[0]:
            if step != self.drawn:
                raise RuntimeError(f"k-means++ stream asked for step {step} after drawing {self.drawn} steps")
            self._block(device)
        return self.ahead[step - self.ahead_from]


_AHEAD = 1 << 25  # random numbers drawn ahead at once (256 MB of float64)


class _RaceStream:
    """The race numbers of one stream in one call: from ``cache`` where it holds them, else drawn
    (and recorded in ``cache`` when there is one)."""

    def __init__(self, seed: int, n: int, trials: int, gen_device: torch.device, device: torch.device,
                 cache: Optional[SeedingCache], steps_ahead: int = 0) -> None:
        self.gen_device, self.shape, self.device, self.cache = gen_device, (trials, n), device, cache
        self.keep = n if n <= 256 else max(256, n // 64)  # kept exponentials per trial
        key = (seed, n, trials, str(gen_device), str(device))
        self.record = cache._get(key) if cache is not None else None
        if self.record is None:  # first call with this seed: draw, and remember if there is a cache
            # without a cache, the call's numbers are drawn in blocks (``steps_ahead`` steps)
            ahead = (steps_ahead, trials, n) if cache is None and steps_ahead > 0 else None
            self.record = _Record(seed, gen_device, device, ahead)
            if cache is not None:
                cache._put(key, self.record)

    def first(self) -> Tensor:
        """(1,) float64 uniform of the first centre."""
        return self.record.first

    def kept(self, step: int) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """Kept (idx (T, m) ascending, E (T, m), tau (T,)) of a step, or None if not recorded."""
        r = self.record
        if step >= len(r.idx):
            return None
        return r.idx[step], r.val[step], r.tau[step]

    def full(self, step: int) -> Tensor:
        """All (T, n) exponentials of a step: drawn again from the saved state, or drawn next
        (and recorded when there is a cache)."""
        r = self.record
        ahead = r.drawn_ahead(step, self.device)
        if ahead is not None:
            return ahead
        if step < len(r.states):  # drawn again from the saved state
            g = torch.Generator(device=self.gen_device)
            g.set_state(r.states[step])
            return _random(g, self.shape, "exponential").to(self.device)
        if step != r.drawn:
            raise RuntimeError(f"k-means++ stream asked for step {step} after drawing {r.drawn} steps")
        state = r.generator.get_state() if self.cache is not None else None
        try:
            race = _random(r.generator, self.shape, "exponential").to(self.device)  # (T, n)
            if state is not None:
                if self.keep >= self.shape[1]:
                    idx = torch.arange(self.shape[1], device=self.device).expand(self.shape).contiguous()
                    tau = torch.full(self.shape[:1], math.inf, dtype=torch.float64, device=self.device)
                else:
                    low = race.topk(self.keep + 1, dim=-1, largest=False)  # (T, keep + 1) smallest first
                    idx, tau = low.indices[:, :-1].sort(dim=-1).values, low.values[:, -1]  # (T, keep), (T,)
                val = torch.gather(race, 1, idx)  # (T, keep)
        except BaseException:
            if state is not None:
                r.generator.set_state(state)  # a cached record stays consistent
            raise
        r.drawn += 1
        if state is not None:
            r.idx.append(idx)
            r.val.append(val)
            r.tau.append(tau)
            r.states.append(state)
        return race


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


def _race(streams: list[_RaceStream], step: int, weights: Tensor) -> Tensor:
    """D^2 candidates of one k-means++ step, item b taking stream ``b % streams``.

    The kept numbers of a cache decide a race only after a host read (are all races decided by
    them?); that read is taken on the CPU, where drawing costs more than the rest of the
    seeding, and not on an accelerator, where it would stall the queue and the full draw is
    cheap. Either way the indices are the same.

    weights: (B, N) -> (B, T) long, the indices ``_d2_sample`` gives with the step's numbers
    """
    b = weights.shape[0]
    kept = [s.kept(step) for s in streams] if cpu_tuned(weights.device) else [None]
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
    race = streams[0].full(step)[None] if len(streams) == 1 else torch.stack(
        [s.full(step) for s in streams])  # (streams, T, N)
    race = race.expand(b, *race.shape[1:]) if len(streams) == 1 else race[
        torch.arange(b, device=weights.device) % len(streams)]  # (B, T, N)
    return _d2_sample(weights, race)


def _stream_seeds(generator: torch.Generator, streams: int) -> list[int]:
    """One seed per random stream, drawn from ``generator`` one stream at a time, so stream 0
    is the same whatever the number of streams (restart 0 equals the ``n_init=1`` run)."""
    return [int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)) for _ in range(streams)]


def _race_setup(x: Tensor, k: int, generator: torch.Generator, streams: int,
                cache: Optional[SeedingCache]) -> tuple[list[_RaceStream], Tensor]:
    """Random streams of k-means++ and each item's first centre. x: (B, N, D) -> races, (B, 1) long

    Off the CPU paths the cache is not used (its kept numbers need a host read to decide a
    race) and each stream's numbers for all k - 1 steps are drawn at once and moved to the
    device in one copy (the same numbers: one generator fills them in order)."""
    b, n, _ = x.shape
    trials = 2 + int(math.log(k))
    ahead = 0
    if not cpu_tuned(x.device):
        cache, ahead = None, k - 1
    races = [_RaceStream(seed, n, trials, generator.device, x.device, cache, ahead)
             for seed in _stream_seeds(generator, streams)]
    first = torch.stack([r.first() for r in races])  # (streams, 1) float64 uniforms
    first = first.expand(b, 1) if streams == 1 else first[torch.arange(b, device=x.device) % streams]
    return races, (first * n).long().clamp_(max=n - 1)  # (B, 1) uniform index


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, idx[b, j]] for all b, j. x: (B, N, D), idx: (B, m) -> (B, m, D)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _chunk(n: int, k: int, b: int, device: torch.device) -> int:
    """Points per chunk of a (B, k, chunk) block of scores (the k-means E-step's, and the first
    k-means++ distances'). GPUs take all; on the CPU the scores are kept to about 4M values
    (16 MB): large enough that each op amortises waking the thread pool (with
    OMP_WAIT_POLICY=PASSIVE, chunks of 13k points made the E-step 2x slower), small enough to
    bound the memory of a batch."""
    if not cpu_tuned(device):
        return n
    return max(1024, (1 << 22) // max(k * b, 1))


def _first_dist(c: Tensor, xt: Tensor, x_sq: Tensor) -> Tensor:
    """Squared distances to the first centre, by expansion in the E-step's chunks (so they are
    bit for bit the E-step's distances to one centre), clamped at 0.

    c: (B, 1, D), xt: (B, D, N) contiguous, x_sq: (B, N) -> (B, N)
    """
    b, _, n = xt.shape
    c_sq = (c * c).sum(-1)[..., None]  # (B, 1, 1)
    step = _chunk(n, 1, b, xt.device)
    parts = [torch.baddbmm(c_sq, c, xt[:, :, start:start + step], alpha=-2.0)[:, 0]  # (B, n')
             for start in range(0, n, step)]  # chunks along the points keep the scores small
    dist = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, N)
    return (dist + x_sq).clamp_min_(0)


def _sq_dist(c: Tensor, xt: Tensor, x_sq: Tensor) -> Tensor:
    """Squared distances of points to a few centres by expansion, clamped at 0.

    c: (B, T, D), xt: (B, D, N) contiguous, x_sq: (B, N) -> (B, T, N)
    """
    c_sq = (c * c).sum(-1)[..., None]  # (B, T, 1)
    return torch.baddbmm(c_sq, c, xt, alpha=-2.0).add_(x_sq[:, None, :]).clamp_min_(0)


def kmeans_plusplus(
    x: Tensor,
    k: int,
    generator: torch.Generator,
    x_sq: Optional[Tensor] = None,
    streams: int = 1,
    xt: Optional[Tensor] = None,
    cache: Optional[SeedingCache] = None,
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
        cache: optional ``SeedingCache`` that keeps the random numbers for later calls
            (same result; None: draw them).

    Returns:
        (B, k, D) initial centres (rows of x).
    """
    b, n, d = x.shape
    if x_sq is None:
        x_sq = (x * x).sum(-1)
    if xt is None:
        xt = x.transpose(1, 2).contiguous()  # (B, D, N)
    races, first = _race_setup(x, k, generator, streams, cache)
    centers = [_rows(x, first)]  # each (B, 1, D)
    closest = _first_dist(centers[0], xt, x_sq)  # (B, N) squared distance to the nearest centre
    for step in range(k - 1):
        cand = _race(races, step, closest)  # (B, T)
        cand_x = _rows(x, cand)  # (B, T, D)
        dist = _sq_dist(cand_x, xt, x_sq)  # (B, T, N)
        new_closest = torch.minimum(closest[:, None, :], dist)  # (B, T, N)
        best = new_closest.sum(-1).argmin(dim=-1)  # (B,)
        closest = new_closest.gather(1, best[:, None, None].expand(-1, 1, n)).squeeze(1)  # (B, N)
        centers.append(torch.gather(cand_x, 1, best[:, None, None].expand(-1, 1, d)))  # (B, 1, D)
    return torch.cat(centers, dim=1)  # (B, k, D)


def kmeans_plusplus_native(
    x: Tensor,
    k: int,
    generator: torch.Generator,
    streams: int = 1,
    xt: Optional[Tensor] = None,
    cache: Optional[SeedingCache] = None,
) -> Tensor:
    """``kmeans_plusplus`` with the distance and potential work in the C kernel (same draws,
    same greedy choice; squared distances summed directly instead of by expansion).

    Args:
        x: (B, N, D) float32 contiguous CPU points; k, generator, streams, cache: as
            ``kmeans_plusplus``.
        xt: its (B, D, N) contiguous transpose, used when D <= ``kernels.NARROW_D``
            (computed when None).

    Returns:
        (B, k, D) initial centres (rows of x).
    """
    b, n, d = x.shape
    pts = kernels.kernel_points(x, xt)
    races, first = _race_setup(x, k, generator, streams, cache)
    cand_x = _rows(x, first).contiguous()  # (B, 1, D)
    centers = [cand_x]
    closest = torch.full((b, n), math.inf, dtype=torch.float32)  # (B, N)
    chosen = torch.empty(b, dtype=torch.int64)  # (B,)
    kernels.kmeanspp_step(pts, n, d, cand_x, closest, chosen)
    for step in range(k - 1):
        cand = _race(races, step, closest)  # (B, T)
        cand_x = _rows(x, cand).contiguous()  # (B, T, D)
        kernels.kmeanspp_step(pts, n, d, cand_x, closest, chosen)
        centers.append(torch.gather(cand_x, 1, chosen[:, None, None].expand(-1, 1, d)))  # (B, 1, D)
    return torch.cat(centers, dim=1)  # (B, k, D)
