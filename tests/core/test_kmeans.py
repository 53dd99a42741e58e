import importlib.util

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from torch.utils._python_dispatch import TorchDispatchMode

from pccfast.backends import kernels, native
from pccfast.core import seeding
from pccfast.core.kmeans import PreparedPoints, assign, kmeans, kmeans_inertia, kmeans_plusplus, prepare_points
from pccfast.core.seeding import SeedingCache, _chunk

NATIVE = native.available("kmeans", warn=False)
needs_native = pytest.mark.skipif(not NATIVE, reason="the C k-means kernel does not build here (no C compiler?)")


@pytest.fixture(params=["torch", pytest.param("native", marks=needs_native)])
def backend(request):
    """Both CPU implementations: the torch path and the C kernel (kernels/kmeans.c)."""
    return request.param


def _blobs(seed, n=600, k=5, d=8, std=0.6):
    x, y = make_blobs(n_samples=n, centers=k, n_features=d, cluster_std=std, random_state=seed)
    return x.astype(np.float32), y


def _pcc_like(seed, side=32, d=30):
    """Features like section 2's: piecewise-constant regions + noise, min-max normalised, + x, y."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side] / (side - 1)
    region = (xx > 0.4).astype(int) + 2 * ((xx - 0.5) ** 2 + (yy - 0.6) ** 2 < 0.08)
    means = rng.normal(size=(4, d))
    f = means[region.ravel()] + 0.5 * rng.normal(size=(side * side, d))
    f = (f - f.min(0)) / (f.max(0) - f.min(0))
    return np.concatenate([f, xx.reshape(-1, 1), yy.reshape(-1, 1)], 1).astype(np.float32)


def test_smoke(device):
    x = torch.rand(3, 100, 4, device=device)
    labels, centers = kmeans(x, 5, generator=torch.Generator().manual_seed(0))
    assert labels.shape == (3, 100) and labels.dtype == torch.long and labels.device.type == device.type
    assert centers.shape == (3, 5, 4) and int(labels.min()) >= 0 and int(labels.max()) < 5


def test_value_two_groups(backend):
    """Two tight groups far apart: labels split exactly, centres are the group means."""
    x = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [11.0, 10.0]]])
    labels, centers = kmeans(x, 2, backend=backend)
    assert labels[0, 0] == labels[0, 1] == labels[0, 2] != labels[0, 3] == labels[0, 4] == labels[0, 5]
    got = sorted(centers[0].tolist())
    assert np.allclose(got, [[1 / 3, 1 / 3], [31 / 3, 31 / 3]], atol=1e-5)


def test_blobs_match_sklearn(backend):
    """ARI >= 0.9 against scikit-learn and inertia within 2% on well-separated blobs (batched)."""
    data = [_blobs(s) for s in range(4)]
    x = torch.from_numpy(np.stack([d[0] for d in data]))  # (4, 600, 8)
    labels, centers = kmeans(x, 5, generator=torch.Generator().manual_seed(0), backend=backend)
    inertia = kmeans_inertia(x, labels, centers)
    for i, (xi, yi) in enumerate(data):
        sk = KMeans(5, n_init=1, random_state=0).fit(xi)
        assert adjusted_rand_score(sk.labels_, labels[i].numpy()) >= 0.9
        assert adjusted_rand_score(yi, labels[i].numpy()) >= 0.9
        assert float(inertia[i]) <= 1.02 * sk.inertia_


@pytest.mark.parametrize("k", [4, 7, 10])
def test_pcc_like_features_vs_sklearn(k):
    """On PCC-like features: report ARI vs scikit-learn; inertia within 10% of scikit-learn's."""
    x = np.stack([_pcc_like(s) for s in range(3)])
    labels, centers = kmeans(torch.from_numpy(x), k, generator=torch.Generator().manual_seed(0))
    inertia = kmeans_inertia(torch.from_numpy(x), labels, centers)
    aris = []
    for i in range(3):
        sk = KMeans(k, n_init=1, random_state=0).fit(x[i])
        aris.append(adjusted_rand_score(sk.labels_, labels[i].numpy()))
        assert float(inertia[i]) <= 1.10 * sk.inertia_
    print(f"k={k} ARI vs sklearn on PCC-like features: {np.round(aris, 3).tolist()}")
    assert min(aris) > 0.3  # different seeds land in different local optima at larger k


@pytest.mark.parametrize("k", [4, 10])
def test_lloyd_matches_sklearn_from_same_init(k, backend):
    """Given the same initial centres, Lloyd (with scikit-learn's tolerance rule) gives the same
    partition and centres as scikit-learn."""
    x = np.stack([_pcc_like(s) for s in range(2)]).astype(np.float64)
    init = np.stack([xi[np.random.default_rng(i).choice(len(xi), k, replace=False)] for i, xi in enumerate(x)])
    labels, centers = kmeans(torch.from_numpy(x), k, init=torch.from_numpy(init), backend=backend)
    atol = 1e-6 if backend == "torch" else 1e-5  # the C kernel computes in float32
    for i in range(2):
        sk = KMeans(k, init=init[i], n_init=1).fit(x[i])
        assert adjusted_rand_score(sk.labels_, labels[i].numpy()) == 1.0
        assert np.allclose(sk.cluster_centers_, centers[i].numpy(), atol=atol)


def test_labels_are_nearest_centres_and_centres_are_means(backend):
    """A converged Lloyd solution: each point's centre is its nearest, each centre its points' mean."""
    x = torch.from_numpy(_pcc_like(7))[None]
    labels, centers = kmeans(x, 7, tol=0.0, backend=backend)
    near, _ = assign(x, centers)
    assert torch.equal(near, labels)
    for c in range(7):
        sel = x[0][labels[0] == c]
        assert torch.allclose(sel.mean(0), centers[0, c], atol=1e-4)


def test_empty_clusters_are_relocated(backend):
    """Only 3 distinct points but k = 3 with heavy duplicates: no NaN, every cluster used."""
    x = torch.tensor([[0.0, 0.0]] * 20 + [[5.0, 5.0]] * 20 + [[9.0, 0.0]])[None]
    labels, centers = kmeans(x, 3, backend=backend)
    assert torch.isfinite(centers).all()
    assert labels[0].unique().numel() == 3


def test_empty_cluster_in_update():
    """Regression: an empty cluster after an E-step takes the farthest point and no NaN appears."""
    from pccfast.core.kmeans import _update

    x = torch.tensor([[[0.0], [1.0], [2.0], [10.0]]])
    labels = torch.tensor([[0, 0, 0, 0]])
    min_dist = torch.tensor([[9.0, 4.0, 1.0, 49.0]])
    old = torch.tensor([[[3.0], [100.0]]])
    new = _update(x, labels, min_dist, old, 2)
    assert torch.allclose(new[0, :, 0], torch.tensor([1.0, 10.0]))


def test_plusplus_picks_rows_and_spreads():
    x = torch.tensor([[[0.0, 0.0]] * 50 + [[100.0, 100.0]] * 50])
    c = kmeans_plusplus(x, 2, torch.Generator().manual_seed(3))
    assert sorted(c[0, :, 0].tolist()) == [0.0, 100.0]


def test_deterministic_global_rng_untouched_and_n_init():
    x = torch.from_numpy(np.stack([_pcc_like(1), _pcc_like(2)]))
    state = torch.get_rng_state()
    a = kmeans(x, 7, generator=torch.Generator().manual_seed(5))
    b = kmeans(x, 7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(state, torch.get_rng_state())
    # restart 0 of n_init=4 is the n_init=1 run, so the best of 4 is never worse
    one = kmeans_inertia(x, *kmeans(x, 7, seed=1))
    many = kmeans_inertia(x, *kmeans(x, 7, seed=1, n_init=4))
    assert (many <= one + 1e-4).all()


def test_batch_independent(backend):
    """An image gets the same clusters alone as inside a batch (same random numbers per item)."""
    x = torch.from_numpy(np.stack([_pcc_like(s) for s in range(3)]))
    together = kmeans(x, 7, backend=backend)[0]
    for i in range(3):
        alone = kmeans(x[i:i + 1], 7, backend=backend)[0][0]
        assert adjusted_rand_score(alone.numpy(), together[i].numpy()) == 1.0


def test_exceptions():
    with pytest.raises(ValueError, match=r"`k` has to lie in \[1, N\] = \[1, 4\] but is 5"):
        kmeans(torch.zeros(1, 4, 2), 5)
    with pytest.raises(ValueError, match=r"`x` has to have 3 dimensions but has shape \(4, 2\)"):
        kmeans(torch.zeros(4, 2), 2)
    with pytest.raises(ValueError, match="`backend` has to be one of 'auto', 'torch', 'native', 'cuml' but is 'sk'"):
        kmeans(torch.zeros(1, 4, 2), 2, backend="sk")
    with pytest.raises(ValueError, match=r"`init` has to have shape \(B, k, D\) = \(1, 2, 2\) with n_init=1"):
        kmeans(torch.zeros(1, 4, 2), 2, init=torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="`max_iter` has to be at least 1 but is 0"):
        kmeans(torch.zeros(1, 4, 2), 2, max_iter=0)


@pytest.mark.skipif(importlib.util.find_spec("cuml") is not None, reason="cuML is installed")
def test_cuml_missing_message():
    with pytest.raises(ImportError, match="pip install cuml-cu12"):
        kmeans(torch.zeros(1, 4, 2), 2, backend="cuml")


# ---------------------------------------------------------------- the C kernel (backend "native")


def _noisy_pixels(seed, side=48):
    """Refinement-like points (R, G, B, x', y'): a few colour regions plus noise, many Lloyd steps."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    region = ((xx > side // 3).long() + 2 * ((xx - side // 2) ** 2 + (yy - side // 2) ** 2 < (side // 4) ** 2).long())
    colours = torch.rand(4, 3, generator=g) * 255
    rgb = colours[region.reshape(-1)] + 25 * torch.randn(side * side, 3, generator=g)
    pos = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1).float() * (255 / side)
    return torch.cat([rgb, pos], -1)  # (side*side, 5)


@needs_native
@pytest.mark.parametrize("wide", [False, True])
def test_native_pruning_is_exact(wide):
    """The bounds (Hamerly for narrow points, Elkan for wide ones) only skip distances that
    cannot win: labels, centres and iteration count equal the unpruned Lloyd bit for bit."""
    from pccfast.core.kmeans import _kmeans_native

    if wide:
        x = torch.from_numpy(np.stack([_pcc_like(s, side=40, d=30) for s in range(3)]))  # D = 32 > 16
        k = 10
    else:
        x = torch.stack([_noisy_pixels(s) for s in range(3)])  # D = 5
        k = 20
    a = _kmeans_native(x, k, 300, 1e-4, torch.Generator().manual_seed(0), prune=True)
    b = _kmeans_native(x, k, 300, 1e-4, torch.Generator().manual_seed(0), prune=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the same through the binding, with the iteration counts it reports
    prep = prepare_points(x, transpose=True, norms=False)
    init = seeding.kmeans_plusplus_native(prep.x, k, torch.Generator().manual_seed(0), xt=prep.xt)  # (B, k, D)
    tol = (1e-4 * prep.var.double()).contiguous()
    pts = kernels.kernel_points(prep.x, prep.xt)
    runs = [kernels.kmeans_lloyd(pts, x.shape[1], x.shape[2], init.clone(), tol, 300, prune) for prune in (True, False)]
    for got, want in zip(*runs):
        assert torch.equal(got, want)
    assert int(runs[0][2].min()) > 1  # several iterations, so the bounds were used


@needs_native
@pytest.mark.parametrize("d", [5, 32])
def test_native_matches_torch_path(d):
    """Same k-means++ draws and the same Lloyd rules: the C kernel and the torch path reach the
    same partition (distances are summed differently, so only float ties could differ)."""
    x = torch.stack([_noisy_pixels(s) for s in range(2)]) if d == 5 else \
        torch.from_numpy(np.stack([_pcc_like(s, side=40, d=30) for s in range(2)]))
    for k in (4, 10):
        lt, ct = kmeans(x, k, backend="torch")
        ln, cn = kmeans(x, k, backend="native")
        for i in range(2):
            assert adjusted_rand_score(lt[i].numpy(), ln[i].numpy()) >= 0.999
        assert torch.allclose(ct, cn, rtol=1e-3, atol=1e-3)


@needs_native
def test_native_max_iter_and_empty_cluster_match_torch_from_same_init():
    """From the same initial centres, with an iteration cap and with a cluster that starts
    empty (its centre far from every point), both paths give the same labels and centres."""
    x = torch.stack([_noisy_pixels(3, side=24)])  # (1, 576, 5)
    init = x[:, [0, 100, 300, 500]].clone()
    init[0, 2] = 1e4  # nobody's nearest: relocated to the farthest point in the first M-step
    for max_iter in (1, 2, 300):
        lt, ct = kmeans(x, 4, init=init, max_iter=max_iter, backend="torch")
        ln, cn = kmeans(x, 4, init=init, max_iter=max_iter, backend="native")
        assert torch.equal(lt, ln), max_iter
        assert torch.allclose(ct, cn, atol=1e-3), max_iter


def test_backend_resolution(monkeypatch):
    """float64 points stay on the torch path under "auto" (float64 centres; the kernel computes
    in float32); "native" off the CPU names the option; PCCFAST_NATIVE=0 disables the kernel."""
    x = torch.from_numpy(_pcc_like(3, side=12, d=4))[None]  # (1, 144, 6)
    lab64, cen64 = kmeans(x.double(), 4, backend="auto")
    want = kmeans(x.double(), 4, backend="torch")
    assert cen64.dtype == torch.float64 and torch.equal(lab64, want[0]) and torch.equal(cen64, want[1])
    if NATIVE:
        assert kmeans(x.double(), 4, backend="native")[1].dtype == torch.float32
        assert all(torch.equal(a, b) for a, b in zip(kmeans(x, 4, backend="auto"), kmeans(x, 4, backend="native")))
    with pytest.raises(ValueError, match="kmeans backend 'native' runs on the CPU but the input is on meta; "
                                         "use backend='auto' or 'torch'"):
        kmeans(torch.zeros(1, 4, 2, device="meta"), 2, backend="native")
    monkeypatch.setenv("PCCFAST_NATIVE", "0")
    assert all(torch.equal(a, b) for a, b in zip(kmeans(x, 4, backend="auto"), kmeans(x, 4, backend="torch")))
    with pytest.raises(native.NativeUnavailable, match="disabled by PCCFAST_NATIVE=0"):
        kmeans(x, 2, backend="native")


def test_native_build_failure_is_one_line(monkeypatch, tmp_path):
    """A kernel that does not compile gives NativeUnavailable with the compiler's error line,
    and "auto" warns once and uses torch."""
    monkeypatch.delenv("PCCFAST_NATIVE", raising=False)
    bad = tmp_path / "broken.c"
    bad.write_text("int f( { return 0; }\n")
    monkeypatch.setenv("PCCFAST_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "kernel_source", lambda name: bad)
    try:
        native._compiler()
    except native.NativeUnavailable:
        pytest.skip("no C compiler here")
    with pytest.raises(native.NativeUnavailable, match=r"compiling broken.c with .* failed: .*error") as err:
        native.load("broken")
    assert "\n" not in str(err.value)
    with pytest.warns(RuntimeWarning, match="using the slower torch path"):
        assert native.available("broken") is False
    monkeypatch.undo()
    with pytest.raises(native.NativeUnavailable, match="kernel source no_such_kernel.c not found"):
        native.kernel_source("no_such_kernel")


# ---------------------------------------------------------------- k-means++ and its SeedingCache


@pytest.mark.parametrize("n_init", [1, 2])
def test_seeding_cache_gives_identical_results(backend, n_init):
    """Results are bit-identical with and without a cache: on the first call (drawing), on a
    repeat (kept numbers), on other points of the same size (kept numbers with other weights),
    and for a larger k with the same trials (k = 7 continues k = 4's streams)."""
    x = torch.stack([_noisy_pixels(s, side=40) for s in range(2)])  # (2, 1600, 5)
    y = torch.stack([_noisy_pixels(s + 5, side=40) for s in range(2)])
    cache = SeedingCache()
    for pts, k in ((x, 4), (x, 4), (y, 4), (y, 7), (x, 7), (x, 10)):
        plain = kmeans(pts, k, backend=backend, n_init=n_init)
        cached = kmeans(pts, k, backend=backend, n_init=n_init, cache=cache)
        assert torch.equal(plain[0], cached[0]) and torch.equal(plain[1], cached[1]), k
    assert len(cache) == 2 * n_init  # trials 3 (k = 4, 7) and 4 (k = 10), one stream per restart


def test_seeding_cache_uses_the_kept_numbers(monkeypatch):
    """A second call with the same seed decides its races from the kept numbers: far fewer
    steps draw all (T, N) exponentials again, and the seeds are the same."""
    drawn = []
    full = seeding._RaceStream.full
    monkeypatch.setattr(seeding._RaceStream, "full", lambda self, step: drawn.append(step) or full(self, step))
    x = torch.from_numpy(_pcc_like(4, side=40, d=6))[None]  # (1, 1600, 8): kept = 256 of 1600 per trial
    cache = SeedingCache()
    first = kmeans_plusplus(x, 10, torch.Generator().manual_seed(0), cache=cache)
    assert drawn == list(range(9))
    drawn.clear()
    again = kmeans_plusplus(x, 10, torch.Generator().manual_seed(0), cache=cache)
    assert torch.equal(first, again)
    assert len(drawn) <= 3, drawn  # the rest decided by the kept points
    drawn.clear()
    plain = kmeans_plusplus(x, 10, torch.Generator().manual_seed(0))
    assert torch.equal(first, plain) and drawn == list(range(9))


def test_seeding_cache_bounded_and_owned_by_the_caller():
    """No state outside the cache: without one nothing is kept; with one at most max_entries
    streams, the oldest dropped first."""
    assert not any(isinstance(v, dict) for v in vars(seeding._RaceStream).values())  # no class-level cache
    x = torch.rand(1, 50, 3, generator=torch.Generator().manual_seed(0))
    cache = SeedingCache(max_entries=2)
    for seed in range(3):
        kmeans(x, 3, seed=seed, cache=cache, backend="torch")
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and repr(cache) == "SeedingCache(max_entries=2, streams=0)"
    with pytest.raises(ValueError, match="`max_entries` has to be an integer of at least 1 but is 0"):
        SeedingCache(0)


def test_prepare_points_fields():
    """prepare_points returns named fields; the feature-major layout of refine_points stays a view."""
    x = torch.rand(2, 5, 30, generator=torch.Generator().manual_seed(1)).transpose(1, 2)  # (2, 30, 5) view
    p = prepare_points(x)
    assert isinstance(p, PreparedPoints) and p._fields == ("x", "mean", "xt", "x_sq", "var")
    assert p.xt.is_contiguous() and p.x.transpose(1, 2).is_contiguous()
    assert torch.allclose(p.x, x - x.mean(1, keepdim=True), atol=1e-6)
    assert torch.allclose(p.x_sq, (p.x ** 2).sum(-1), atol=1e-5)
    assert torch.allclose(p.var, (p.x ** 2).mean(dim=(1, 2)), atol=1e-6)
    lean = prepare_points(x.contiguous(), transpose=False, norms=False)
    assert lean.xt is None and lean.x_sq is None and torch.allclose(lean.var, p.var, atol=1e-6)


# ---------------------------------------------------------------- the sync-free Lloyd loop (torch backend)

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "bincount", "masked_select", "equal", "is_nonzero", "_unique",
             "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}


class _SyncCounter(TorchDispatchMode):
    """Counts the ATen ops that read tensor data on the host (a stall on a GPU), by name."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()) or ())
        if name in _SYNC_OPS or bool_index or (name == "repeat_interleave" and func._overloadname == "Tensor"):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def _reference_lloyd(x, k, max_iter, tol, init):
    """The torch Lloyd loop before it went sync-free (bincount, a host branch for empty clusters,
    converged items compacted out of the batch every iteration), kept as the reference.

    x: (B, N, D) float, init: (B, k, D) -> labels (B, N), centres (B, k, D)
    """
    def argmin(scores):  # (B, k, n) -> (B, n), (B, n): first index of the minimum
        kk = scores.shape[1]
        best = scores.amin(dim=1, keepdim=True)
        weight = (kk - torch.arange(kk)).to(torch.uint8 if kk < 256 else torch.int32)[None, :, None]
        return best[:, 0], kk - ((scores == best) * weight).amax(dim=1).long()

    def estep(xt, c, x_sq):
        b, _, n = xt.shape
        step = _chunk(n, c.shape[1], b, xt.device)
        c_sq = (c * c).sum(-1)[..., None]
        parts = [argmin(torch.baddbmm(c_sq, c, xt[:, :, s:s + step], alpha=-2.0)) for s in range(0, n, step)]
        best, idx = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        return idx, (best + x_sq).clamp_min_(0)

    def mstep(x, labels, min_dist, old, xt):
        b, n, d = x.shape
        flat = (labels + torch.arange(b)[:, None] * k).reshape(-1)
        if d <= 16:
            idx = (labels + (torch.arange(n) % 8) * k)[:, None, :].expand(b, d, n)
            sums = torch.zeros(b, d, 8 * k, dtype=x.dtype).scatter_add_(2, idx, xt)
            sums = sums.view(b, d, 8, k).sum(2).transpose(1, 2)
        else:
            sums = torch.zeros(b * k, d, dtype=x.dtype).index_add_(0, flat, x.reshape(-1, d)).view(b, k, d)
        counts = torch.bincount(flat, minlength=b * k).view(b, k).to(x.dtype)
        empty = counts == 0
        if bool(empty.any()):
            far = min_dist.topk(k, dim=-1).indices
            point = torch.gather(far, 1, (torch.cumsum(empty.long(), dim=-1) - 1).clamp_min(0))
            px = torch.gather(x, 1, point[..., None].expand(-1, -1, d)) * empty[..., None]
            src = torch.gather(labels, 1, point)
            sums = sums.scatter_add(1, src[..., None].expand(-1, -1, d), -px)
            counts = counts.scatter_add(1, src, -empty.to(counts.dtype))
            sums = torch.where(empty[..., None], px, sums)
            counts = torch.where(empty, torch.ones_like(counts), counts)
        new = sums / counts.clamp_min(1)[..., None]
        return torch.where((counts > 0)[..., None], new, old)

    p = prepare_points(x)
    tol_abs = tol * p.var
    final = (init.to(x.dtype) - p.mean).clone()
    act = torch.arange(x.shape[0])
    xa, xta, sqa, tola, ca, prev = p.x, p.xt, p.x_sq, tol_abs, final.clone(), None
    for it in range(max_iter):
        labels, min_dist = estep(xta, ca, sqa)
        new = mstep(xa, labels, min_dist, ca, xta)
        done = ((new - ca) ** 2).sum(dim=(1, 2)) <= tola
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
    labels, _ = estep(p.xt, final, p.x_sq)
    return labels, final + p.mean


def _sync_free_cases():
    """(name, points (B, N, D), k): narrow and wide points, one item with a cluster that starts empty."""
    pix = torch.stack([_noisy_pixels(s, side=40) for s in range(3)])  # (3, 1600, 5)
    pcc = torch.from_numpy(np.stack([_pcc_like(s, side=24) for s in range(3)]))  # (3, 576, 32)
    return [("pixels", pix, 10), ("pixels", pix, 20), ("pcc", pcc, 4), ("pcc", pcc, 10)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_iter", [1, 3, 300])
def test_sync_free_lloyd_equals_the_compacting_loop(dtype, max_iter):
    """Regression: masking converged items (instead of compacting them out), counts by a
    scatter (instead of bincount), empty clusters handled without a host branch and the
    convergence read every ``check_every`` iterations leave labels and centres bit-identical to
    the former loop, whatever ``check_every``; one item starts with an empty cluster."""
    for name, x, k in _sync_free_cases():
        x = x.to(dtype)
        mean = x.mean(1, keepdim=True)  # (B, 1, D)
        init = kmeans_plusplus(x - mean, k, torch.Generator().manual_seed(0)) + mean  # (B, k, D)
        init[1, 0] = 1e4  # nobody's nearest: relocated to the farthest point in the first M-step
        want = _reference_lloyd(x, k, max_iter, 1e-4, init)
        for check_every in (1, 8, 1000):
            got = kmeans(x, k, init=init, max_iter=max_iter, backend="torch", check_every=check_every)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (name, k, check_every)
            assert got[1].dtype == dtype


@pytest.mark.parametrize("k", [4, 10])
def test_check_every_matches_sklearn_from_same_init(k):
    """check_every 1, 8 and 1000 give one result, scikit-learn's partition and centres."""
    x = np.stack([_pcc_like(s) for s in range(2)]).astype(np.float64)
    init = np.stack([xi[np.random.default_rng(i).choice(len(xi), k, replace=False)] for i, xi in enumerate(x)])
    runs = [kmeans(torch.from_numpy(x), k, init=torch.from_numpy(init), backend="torch", check_every=c)
            for c in (1, 8, 1000)]
    for got in runs[1:]:
        assert torch.equal(got[0], runs[0][0]) and torch.equal(got[1], runs[0][1])
    for i in range(2):
        sk = KMeans(k, init=init[i], n_init=1).fit(x[i])
        assert adjusted_rand_score(sk.labels_, runs[0][0][i].numpy()) == 1.0
        assert np.allclose(sk.cluster_centers_, runs[0][1][i].numpy(), atol=1e-6)


def test_lloyd_loop_has_no_host_sync_between_checks():
    """The torch Lloyd loop reads device data on the host only at its convergence checks: for
    max_iter=40 and check_every=8 at most 40/8 reads (plus one for the k-means++ stream seed),
    all of them ``_local_scalar_dense``; no bincount, nonzero or boolean-mask index."""
    x = torch.stack([_noisy_pixels(s, side=40) for s in range(3)])  # (3, 1600, 5)
    for init in (None, x[:, :20].clone()):
        counter = _SyncCounter()
        with counter:
            kmeans(x, 20, max_iter=40, tol=0.0, init=init, backend="torch", check_every=8)
        assert len(counter.syncs) <= 40 // 8 + 1, counter.syncs
        assert set(counter.syncs) <= {"_local_scalar_dense"}, counter.syncs
    with _SyncCounter() as every:  # check_every=1 reads after every iteration: the counter sees them
        kmeans(x, 20, max_iter=40, tol=0.0, init=x[:, :20].clone(), backend="torch", check_every=1)
    assert len(every.syncs) > len(counter.syncs)


def test_update_keep_freezes_items_and_relocates_without_a_branch():
    """Regression: ``_update`` relocates an empty cluster in one item while another item,
    without empty clusters, gets plain means; ``keep=False`` leaves an item's centres as they were."""
    from pccfast.core.kmeans import _update

    x = torch.tensor([[[0.0], [1.0], [2.0], [10.0]], [[0.0], [1.0], [5.0], [6.0]]])  # (2, 4, 1)
    labels = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]])
    min_dist = torch.tensor([[9.0, 4.0, 1.0, 49.0], [0.25, 0.25, 0.25, 0.25]])
    old = torch.tensor([[[3.0], [100.0]], [[0.0], [9.0]]])
    new = _update(x, labels, min_dist, old, 2)
    assert torch.equal(new[:, :, 0], torch.tensor([[1.0, 10.0], [0.5, 5.5]]))
    frozen = _update(x, labels, min_dist, old, 2, keep=torch.tensor([True, False]))
    assert torch.equal(frozen[0], new[0]) and torch.equal(frozen[1], old[1])


def test_check_every_exception():
    with pytest.raises(ValueError, match="`check_every` has to be an integer of at least 1 but is 0"):
        kmeans(torch.zeros(1, 4, 2), 2, check_every=0)
    from pccfast.core.config import PCCConfig

    with pytest.raises(ValueError, match="`kmeans_check_every` has to be at least 1 but is 0"):
        PCCConfig(kmeans_check_every=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [3, 40])
def test_kmeans_many_equals_one_kmeans_per_k(dtype, d):
    """Regression for the joint Lloyd loop: the k-means of several k in one loop (centres padded
    to the largest k) give, for each k, exactly the labels of a ``kmeans`` call of its own,
    including clusterings that converge many iterations before the others and empty clusters."""
    from pccfast.core.kmeans import kmeans_many

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 900, d, generator=g, dtype=torch.float64).to(dtype)
    x[:, :300] *= 1e-3  # a tight blob: empty clusters get relocated
    x[1, 600:] += 4.0
    ks = (4, 7, 10, 2)
    many = kmeans_many(x, ks, backend="torch", seed=3, check_every=3)
    for k, labels in zip(ks, many):
        alone, _ = kmeans(x, k, backend="torch", seed=3, check_every=3)
        assert torch.equal(labels, alone), k


def test_kmeans_many_uses_the_callers_generator_in_order():
    """With one generator for every k (as blocky_mask with a caller's generator), the seedings
    draw from it one after the other, as consecutive ``kmeans`` calls do."""
    from pccfast.core.kmeans import kmeans_many

    x = torch.randn(2, 400, 5, generator=torch.Generator().manual_seed(1))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    many = kmeans_many(x, (3, 6), generators=[g1, g1], backend="torch")
    one = [kmeans(x, k, generator=g2, backend="torch")[0] for k in (3, 6)]
    assert all(torch.equal(a, b) for a, b in zip(many, one))


@pytest.mark.skipif(not __import__("pccfast.backends.native", fromlist=["x"]).available("kmeans"),
                    reason="the C kernel could not be built (no compiler)")
def test_kmeans_many_other_backends_run_each_k():
    from pccfast.core.kmeans import kmeans_many

    x = torch.randn(2, 500, 6, generator=torch.Generator().manual_seed(2))
    many = kmeans_many(x, (4, 7), backend="native", seed=1)
    assert all(torch.equal(a, kmeans(x, k, backend="native", seed=1)[0]) for a, k in zip(many, (4, 7)))


def test_kmeans_many_exceptions():
    from pccfast.core.kmeans import kmeans_many

    x = torch.zeros(1, 5, 2)
    with pytest.raises(ValueError, match="`ks` has to hold at least one cluster count but is empty"):
        kmeans_many(x, ())
    with pytest.raises(ValueError, match=r"every k in `ks` has to be an integer in \[1, N\] = \[1, 5\] but one is 6"):
        kmeans_many(x, (2, 6))
    with pytest.raises(ValueError, match="`generators` has to hold one generator per k \\(2\\) but holds 1"):
        kmeans_many(x, (2, 3), generators=[torch.Generator()])
