import pytest
import torch

from pccfast.core.config import PCCConfig
from pccfast.core.pca import grouped_headwise_features, headwise_features, headwise_pca, pca_components


def _gapped(b, n, d, c, gen, gap=20.0):
    """Data with a clear spectral gap after c components: (b, n, d) float64."""
    basis = torch.linalg.qr(torch.randn(b, d, d, generator=gen, dtype=torch.float64)).Q
    scales = torch.ones(d, dtype=torch.float64)
    scales[:c] = gap * torch.arange(c, 0, -1, dtype=torch.float64)
    z = torch.randn(b, n, d, generator=gen, dtype=torch.float64) * scales
    return z @ basis.transpose(1, 2) + 3.0


def _svd_components(x, c):
    xc = x - x.mean(dim=1, keepdim=True)
    return torch.linalg.svd(xc, full_matrices=False).Vh[:, :c]  # (B, c, d)


def _captured_variance(x, comps):
    xc = x - x.mean(dim=1, keepdim=True)
    return ((xc @ comps.transpose(1, 2).to(x.dtype)) ** 2).sum(dim=(1, 2))


@pytest.mark.parametrize("method", ["lowrank", "eigh"])
def test_smoke(method, device):
    x = torch.randn(6, 256, 64, device=device)
    y = headwise_pca(x, 3, method=method)
    assert y.shape == (6, 256, 3) and y.dtype == torch.float32 and y.device.type == device.type
    assert torch.allclose(y.mean(dim=1), torch.zeros(6, 3, device=device), atol=1e-4)


@pytest.mark.parametrize("method", ["lowrank", "eigh"])
def test_subspace_matches_svd_with_gap(method):
    gen = torch.Generator().manual_seed(1)
    x = _gapped(8, 1024, 64, 3, gen)
    ref = _svd_components(x, 3)  # (B, 3, d) float64
    comps, _ = pca_components(x.float(), 3, method=method)
    p_ref = ref.transpose(1, 2) @ ref  # projection matrices (B, d, d)
    p = comps.double().transpose(1, 2) @ comps.double()
    dist = torch.linalg.matrix_norm(p - p_ref, ord=2)  # sin of the largest principal angle
    assert dist.max() < 1e-3
    # each component matches up to sign, and the sign rule holds
    cos = (comps.double() * ref).sum(-1).abs()
    assert cos.min() > 0.999
    top = comps.gather(-1, comps.abs().argmax(-1, keepdim=True))
    assert (top > 0).all()


def test_flat_spectrum_variance_close_to_optimal():
    """q = n_components + 3 keeps nearly the optimal 3-D variance on a slowly decaying spectrum
    (like a random model's heads), clearly better than q = n_components."""
    gen = torch.Generator().manual_seed(2)
    scales = (1.0 + torch.arange(64, dtype=torch.float64)) ** -0.5
    x = torch.randn(16, 1024, 64, generator=gen, dtype=torch.float64) * scales
    best = _captured_variance(x, _svd_components(x, 3))
    comps, _ = pca_components(x.float(), 3, method="lowrank", oversample=3, niter=7)
    ratio = _captured_variance(x, comps) / best
    assert ratio.min() > 0.999
    assert ratio.max() <= 1.0 + 1e-4
    comps0, _ = pca_components(x.float(), 3, method="lowrank", oversample=0, niter=7)
    assert (_captured_variance(x, comps0) / best).min() < ratio.min()


def test_eigh_exact_projection():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 300, 16, generator=gen, dtype=torch.float64)
    best = _captured_variance(x, _svd_components(x, 3))
    y = headwise_pca(x, 3, method="eigh")
    assert torch.allclose((y.double() ** 2).sum(dim=(1, 2)), best, rtol=1e-4)


def test_deterministic_and_generator_local():
    x = torch.randn(4, 256, 64, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    a = headwise_pca(x, 3)
    torch.manual_seed(123)
    b = headwise_pca(x, 3)
    assert torch.equal(a, b)
    state = torch.get_rng_state()
    headwise_pca(x, 3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def test_batch_independent():
    """A head's projection does not depend on the other heads in the batch."""
    x = torch.randn(5, 256, 64, generator=torch.Generator().manual_seed(6))
    together = headwise_pca(x, 3)
    assert torch.allclose(headwise_pca(x[3:4], 3)[0], together[3], atol=1e-5)


def test_constant_head_gives_zeros():
    x = torch.full((2, 64, 8), 5.0)
    for method in ("lowrank", "eigh"):
        y = headwise_pca(x, 3, method=method)
        assert torch.isfinite(y).all() and y.abs().max() == 0


def test_headwise_features_layout():
    """Channel order is head-major and pixels row-major; nearest upsampling repeats 4x4 blocks."""
    gen = torch.Generator().manual_seed(5)
    b, heads, s, d = 2, 3, 16, 64
    x = torch.randn(b, heads, s * s, d, generator=gen)
    cfg = PCCConfig(pca_method="eigh")
    f = headwise_features(x, 64, cfg)
    assert f.shape == (b, heads * 3, 64, 64)
    direct = headwise_pca(x[1, 2][None], 3, method="eigh")[0]  # (S*S, 3) for image 1, head 2
    comp1 = direct[:, 1].reshape(s, s)
    expect = comp1.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.allclose(f[1, 2 * 3 + 1], expect, atol=1e-5)
    # same grid: no resampling
    assert headwise_features(x, 16, cfg).shape == (b, 9, 16, 16)


@pytest.mark.parametrize("grid", [32, 64, 40])
def test_headwise_features_upsampling_is_exact(grid):
    """Grid upsampling through core.resize is bit-identical to what it replaced: the broadcast
    copy (repeat_interleave) for whole factors, F.interpolate nearest otherwise."""
    x = torch.randn(2, 3, 16 * 16, 8, generator=torch.Generator().manual_seed(6))
    cfg = PCCConfig(pca_method="eigh")
    small = headwise_features(x, 16, cfg)  # (B, 9, 16, 16)
    if grid % 16 == 0:
        f = grid // 16
        want = small.repeat_interleave(f, -2).repeat_interleave(f, -1)
    else:
        want = torch.nn.functional.interpolate(small, size=(grid, grid), mode="nearest")
    assert torch.equal(headwise_features(x, grid, cfg), want)
    out = torch.full((2, 12, grid, grid), -1.0)
    headwise_features(x, grid, cfg, out=out[:, 1:10])  # into a channel slice
    assert torch.equal(out[:, 1:10], want) and (out[:, 0] == -1).all() and (out[:, 10:] == -1).all()


def test_exceptions():
    with pytest.raises(ValueError, match=r"`x` has to have 3 dimensions but has shape \(4, 5\)"):
        headwise_pca(torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"`n_components` has to lie in \[1, min\(N, d\)\] = \[1, 4\] but is 5"):
        headwise_pca(torch.zeros(1, 10, 4), 5)
    with pytest.raises(ValueError, match="`method` has to be 'lowrank' or 'eigh' but is 'svd'"):
        headwise_pca(torch.zeros(1, 10, 4), 2, method="svd")
    with pytest.raises(ValueError, match="square number of pixels .* but holds 10"):
        headwise_features(torch.zeros(1, 2, 10, 4), 64)
    with pytest.raises(TypeError, match="`x` has to be a floating-point tensor but has dtype torch.int64"):
        headwise_pca(torch.zeros(1, 10, 4, dtype=torch.long))


@pytest.mark.parametrize("offset", [-3.0, 0.0, 1e3])
def test_large_means_keep_the_subspace(offset):
    """The scatter matrix comes from the raw Gram minus a float64 mean correction; columns whose
    mean dwarfs their spread (offset 1e3: mean^2 / var ~ 1e5) are centred explicitly, so the
    subspace stays that of a float64 SVD and the projections are centred."""
    from pccfast.core.pca import _MAX_MEAN_RATIO

    gen = torch.Generator().manual_seed(3)
    x = _gapped(3, 1024, 64, 3, gen) + offset  # (3, 1024, 64) float64, column means 3 + offset
    comps, mean = pca_components(x.float(), 3, method="eigh")
    want = _svd_components(x, 3)
    c = comps.double()  # (3, 3, 64)
    residual = want - (want @ c.transpose(1, 2)) @ c  # the part of the exact axes outside the found span
    print(f"offset {offset}: largest sine of a principal angle {float(residual.norm(dim=-1).max()):.2e}")
    assert float(residual.norm(dim=-1).max()) < 2e-5
    y = headwise_pca(x.float(), 3, method="eigh")
    assert float(y.mean(dim=1).abs().max()) < 1e-3 * float(y.abs().max())
    ratio = float((x.mean(1) ** 2 / x.var(1)).amax())
    if offset == -3.0:
        assert ratio < _MAX_MEAN_RATIO  # the raw-Gram path
    if offset == 1e3:
        assert ratio > _MAX_MEAN_RATIO  # the explicitly centred path


def test_headwise_features_into_out_slice():
    """Writing into a channel slice of a larger tensor gives the same values as a new tensor,
    for integer and non-integer upsampling factors, and a wrong `out` is refused."""
    gen = torch.Generator().manual_seed(4)
    for side, grid in ((8, 16), (8, 8), (6, 16)):
        x = torch.randn(2, 3, side * side, 16, generator=gen)
        alone = headwise_features(x, grid)
        big = torch.zeros(2, 20, grid, grid)
        res = headwise_features(x, grid, out=big[:, 5:14])
        assert res.data_ptr() == big[:, 5:14].data_ptr()
        assert torch.equal(big[:, 5:14], alone) and big[:, :5].abs().sum() == 0 and big[:, 14:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"`out` has to be a float32 tensor of shape \(2, 9, 16, 16\)"):
        headwise_features(x, 16, out=torch.zeros(2, 8, 16, 16))


def _layers(b, gen):
    """Layers of three shapes, two of them twice (like a UNet's up blocks): (B, heads, S*S, d)."""
    shapes = [(6, 4, 8), (6, 4, 8), (4, 8, 8), (4, 8, 8), (2, 16, 16)]  # heads, S, d
    return [torch.randn(b, h, s * s, d, generator=gen) * (1 + torch.arange(d) / 2) + 0.5 for h, s, d in shapes]


@pytest.mark.parametrize("method", ["lowrank", "eigh"])
def test_grouped_headwise_features_equal_per_layer_and_per_image(method):
    """Regression: the capture called headwise_features once per image and layer (a nonzero and
    an eigh sync each). The grouped call gives the same features to the bit, and an image's
    features do not depend on its batch-mates nor on the other layers."""
    cfg = PCCConfig(pca_method=method)
    layers = _layers(3, torch.Generator().manual_seed(7))
    layers[1][1] += 1e3  # image 1 of layer 1: the explicitly centred path (large means)
    got = grouped_headwise_features(layers, 16, cfg)
    for x, f in zip(layers, got):
        assert f.shape == (3, x.shape[1] * 3, 16, 16) and f.dtype == torch.float32
        assert torch.equal(f, headwise_features(x, 16, cfg))
        assert torch.equal(f, torch.cat([headwise_features(x[i : i + 1], 16, cfg) for i in range(3)]))
    alone = grouped_headwise_features([x[2:3] for x in layers[::-1]], 16, cfg)[::-1]
    assert all(torch.equal(f[2:3], a) for f, a in zip(got, alone))


def _count_syncs(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    syncs = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                        torch.ops.aten._linalg_eigh.default):
                syncs.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return syncs


@pytest.mark.parametrize("method", ["lowrank", "eigh"])
def test_grouped_headwise_features_syncs(method):
    """One finiteness check and one eigh (a GPU waits on its error check) per eigenproblem size:
    the (q x q) Ritz matrices of all layers are one eigh (q = 6 here), the exact solver's (d x d)
    covariances one per d (8 and 16). No nonzero."""
    layers = _layers(2, torch.Generator().manual_seed(8))
    syncs = _count_syncs(lambda: grouped_headwise_features(layers, 16, PCCConfig(pca_method=method)))
    assert sorted(syncs) == ["_linalg_eigh.default"] * (1 if method == "lowrank" else 2) + ["_local_scalar_dense.default"]


def test_grouped_headwise_features_exceptions():
    ok = torch.zeros(1, 2, 16, 4)
    bad = torch.ones(1, 2, 16, 4)
    bad[0, 1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"`layers` have to be finite but 1 of 2 hold NaN or infinite values \(e.g. layers\[1\] of shape \(1, 2, 16, 4\)\)"):
        grouped_headwise_features([ok, bad], 8)
    with pytest.raises(ValueError, match="`layers\\[1\\]` has to hold a square number of pixels .* but holds 10"):
        grouped_headwise_features([ok, torch.zeros(1, 2, 10, 4)], 8)
    with pytest.raises(ValueError, match="`layers\\[0\\]` has to have 4 dimensions"):
        grouped_headwise_features([torch.zeros(2, 16, 4)], 8)
    with pytest.raises(ValueError, match="`grid` has to be at least 1 but is 0"):
        grouped_headwise_features([ok], 0)
    with pytest.raises(ValueError, match=r"`n_components` has to lie in \[1, min\(N, d\)\] = \[1, 2\] but is 3"):
        grouped_headwise_features([torch.zeros(1, 2, 16, 2)], 8)
    assert grouped_headwise_features([], 8) == []
