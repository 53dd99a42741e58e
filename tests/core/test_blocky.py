import pytest
import torch

from pccfast.core.blocky import (binary_class_maps, blocky_mask, normalise_class_maps, piece_iou_labels,
                            vote)
from pccfast.core.config import PCCConfig
from pccfast.core.features import assemble_features, minmax_columns, pixel_coordinates


def _two_halves(b=2, d=6, side=16, seed=0):
    """Features with distinct means on the left and right half, background map left, class 1 right."""
    g = torch.Generator().manual_seed(seed)
    right = torch.zeros(side, side, dtype=torch.bool)
    right[:, side // 2:] = True
    means = torch.where(right, 3.0, -3.0)  # (side, side)
    feats = means + 0.3 * torch.randn(b, d, side, side, generator=g)  # (B, D, h, w)
    cams = torch.zeros(b, 3, side, side)  # class 2 absent (all zero)
    cams[:, 0] = (~right).float() * 5 + 0.1 * torch.rand(b, side, side, generator=g)
    cams[:, 1] = right.float() * 2 + 0.1 * torch.rand(b, side, side, generator=g)
    return feats, cams, right


def test_minmax_columns_constant_is_zero():
    x = torch.tensor([[[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]]])
    y = minmax_columns(x)
    assert torch.allclose(y, torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.5, 0.0]]]))


def test_assemble_features_layout():
    f = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    a = assemble_features(f)
    assert a.shape == (1, 12, 4)
    assert torch.allclose(a[0, :, 0], torch.linspace(0, 1, 12))  # row-major pixels
    assert torch.allclose(a[0, 5, 2:], torch.tensor([1 / 3, 0.5]))  # pixel (row 1, col 1): x, y
    assert torch.equal(pixel_coordinates(1, 1), torch.zeros(1, 2))


def test_normalise_class_maps_skips_zero_and_constant():
    cams = torch.zeros(1, 3, 2, 2)
    cams[0, 1] = torch.tensor([[1.0, 3.0], [5.0, 2.0]])
    cams[0, 2] = 4.0
    norm, usable = normalise_class_maps(cams)
    assert usable.tolist() == [[False, True, False]]
    assert torch.allclose(norm[0, 1], torch.tensor([[0.0, 0.5], [1.0, 0.25]]))
    assert torch.isfinite(norm).all()


def test_binary_maps_background_factor():
    norm = torch.tensor([0.35, 0.35, 0.97, 0.85]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    binary = binary_class_maps(norm, torch.ones(1, 2, dtype=torch.bool), (0.3, 0.8), 1.2)
    assert binary.shape == (1, 2, 2, 4)
    assert binary[0, 0, 0].tolist() == [False, False, True, True]  # background: > 0.36
    assert binary[0, 0, 1].tolist() == [True, True, True, True]  # class 1: > 0.3
    assert binary[0, 1, 0].tolist() == [False, False, True, False]  # background: > 0.96
    assert binary[0, 1, 1].tolist() == [False, False, True, True]  # class 1: > 0.8


def test_piece_iou_labels_value():
    """Hand-computed IoUs, including a tie (-> lower class) and a piece overlapping nothing (-> 0)."""
    # 8 pixels, pieces: A = {0,1,2}, B = {3,4}, C = {5,6,7}
    pieces = torch.tensor([[[1, 1, 1, 2, 2, 3, 3, 3]]])  # (B=1, M=1, P=8)
    binary = torch.zeros(1, 1, 4, 8, dtype=torch.bool)  # (B, T=1, K=4, P)
    binary[0, 0, 1, [0, 1]] = True  # class 1: IoU(A) = 2/3
    binary[0, 0, 2, [0, 1, 2, 3]] = True  # class 2: IoU(A) = 3/4, IoU(B) = 1/5
    binary[0, 0, 3, [0, 1, 2, 4]] = True  # class 3: IoU(A) = 3/4, IoU(B) = 1/5 (ties -> class 2)
    out = piece_iou_labels(pieces, binary)
    assert out.tolist() == [[[[2, 2, 2, 2, 2, 0, 0, 0]]]]


def test_vote_value():
    maps = torch.tensor([[2, 2, 2, 2, 2, 2, 0, 1, 1],  # 6/9 -> 2
                         [2, 2, 2, 2, 2, 0, 0, 1, 1],  # 5/9 < 0.56 -> 255
                         [0, 0, 0, 0, 0, 0, 0, 0, 0]]).T[None]  # (1, 9, 3)
    assert vote(maps, 3, 0.56, 255).tolist() == [[2, 255, 0]]
    tie = torch.tensor([[[1], [2], [2], [1]]])  # 2 votes each -> smaller label
    assert vote(tie, 3, 0.0, 255).tolist() == [[1]]


def test_blocky_two_halves(device):
    feats, cams, right = _two_halves()
    out = blocky_mask(feats.to(device), cams.to(device))
    assert out.shape == (2, 16, 16) and out.dtype == torch.uint8
    expect = right.to(torch.uint8).expand(2, -1, -1)
    assert torch.equal(out.cpu(), expect)


def test_blocky_uncertain_when_votes_split():
    """Class 1 and 2 cover the right half equally at t = 0.3 (tie -> class 1) but only class 2
    passes t = 0.5: with thresholds (0.3, 0.5) the votes split 3:3, below the 0.56 share."""
    feats, cams, right = _two_halves(b=1, side=32, seed=1)
    cams[:, 1] = right * 0.4
    cams[0, 1, 0, 31] = 1.0  # the map's maximum: class 1 at t = 0.5 is this one pixel
    cams[:, 2] = right * 1.0
    cfg = PCCConfig(thresholds=(0.3, 0.5))
    out = blocky_mask(feats, cams, cfg)[0]
    assert (out[~right] == 0).all() and (out[right] == 255).all()
    relaxed = blocky_mask(feats, cams, cfg.replace(vote_min_share=0.5))[0]
    assert (relaxed[right] == 1).all()  # 3:3 tie -> smaller label
    only_high = blocky_mask(feats, cams, cfg.replace(thresholds=(0.5,)))[0]
    assert (only_high[right] == 2).all()


def test_blocky_batch_independent():
    feats, cams, _ = _two_halves(b=3, seed=2)
    cams[2, 1] *= 0.0  # image 2 has no class 1
    together = blocky_mask(feats, cams)
    for i in range(3):
        assert torch.equal(blocky_mask(feats[i:i + 1], cams[i:i + 1])[0], together[i])
    assert (together[2] == 0).all()


def test_exceptions():
    feats, cams, _ = _two_halves(b=2)
    with pytest.raises(ValueError, match=r"`class_attention` has to have batch size 2 \(dimension 0\) but has shape \(1, 3, 16, 16\)"):
        blocky_mask(feats, cams[:1])
    with pytest.raises(ValueError, match=r"`class_attention` has to have the grid of `features` \(16, 16\) but has shape \(2, 3, 8, 8\)"):
        blocky_mask(feats, cams[:, :, :8, :8])
    with pytest.raises(ValueError, match="`class_attention` has to hold 1 to 255 classes .* but holds 0"):
        blocky_mask(feats, cams[:, :0])
    with pytest.raises(ValueError, match=r"`features` has to have 4 dimensions but has shape \(6, 16, 16\)"):
        blocky_mask(feats[0], cams)


def test_clustering_points_equal_assembled_then_centred():
    """The fused preparation gives what assemble_features + kmeans.prepare_points give: centred
    normalised columns (a constant column stays 0), column means, transpose, norms, variance."""
    from pccfast.core.features import assemble_features, clustering_points
    from pccfast.core.kmeans import prepare_points

    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 30, 8, 12, generator=g) * 3 + 5
    f[0, 3] = 1.5  # constant column
    got = clustering_points(f, transpose=True)
    want = prepare_points(assemble_features(f))
    for name, a, b in zip(("x", "mean", "xt", "x_sq", "var"), got, want):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    assert float(got[0][0, :, 3].abs().max()) == 0.0
    lean = clustering_points(f)
    assert lean[2] is None and lean[3] is None and torch.allclose(lean[0], got[0], atol=1e-6)


def test_finite_check_catches_nan_inf_but_not_large_finite_values():
    """check_tensor(finite=True) sums once and looks closer only when the sum is not finite."""
    from pccfast.core.checks import check_tensor

    big = torch.full((4,), 3e38)  # the sum overflows to inf, every value is finite
    assert check_tensor(big, "x", finite=True) is big
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(5)
        x[2] = bad
        with pytest.raises(ValueError, match="`x` has to be finite but holds 1 NaN or inf values"):
            check_tensor(x, "x", finite=True)
    x = torch.ones(5)
    x[0], x[1] = float("inf"), -float("inf")  # inf + -inf = NaN in the sum
    with pytest.raises(ValueError, match="holds 2 NaN or inf values"):
        check_tensor(x, "x", finite=True)


@pytest.mark.parametrize("shape", [(3, 30, 8, 12), (2, 5, 1, 7), (1, 40, 16, 1)])
def test_clustering_points_native_equals_torch(shape, monkeypatch):
    """kernels/features.c (CPU, no transpose) gives the torch path's points, means and variance."""
    from pccfast.backends import native
    from pccfast.core.features import clustering_points

    if not native.available("features", warn=False):
        pytest.skip("the C features kernel does not build here (no C compiler?)")
    g = torch.Generator().manual_seed(1)
    f = torch.randn(*shape, generator=g) * 4 - 2
    f[0, 1] = 7.0  # constant column
    got = clustering_points(f)
    monkeypatch.setenv("PCCFAST_NATIVE", "0")
    want = clustering_points(f)
    for name, i in (("x", 0), ("mean", 1), ("var", 4)):
        assert got[i].shape == want[i].shape, name
        assert torch.allclose(got[i], want[i], atol=2e-6, rtol=1e-5), name
    assert got[2] is None and got[3] is None


def test_piece_iou_labels_static_size_no_sync():
    """Regression: the piece table was sized ``int(pieces.max()) + 1`` (one host sync); with
    the static bound (P + 1 for component ids) the IoU vote syncs never and gives the same."""
    from pccfast.testing.counting import OpCounter
    g = torch.Generator().manual_seed(0)
    pieces = torch.randint(1, 30, (2, 3, 64), generator=g)  # (B, M, P)
    binary = torch.rand(2, 3, 4, 64, generator=g) > 0.6  # (B, T, K, P)
    ref = piece_iou_labels(pieces, binary)
    with OpCounter() as c:
        out = piece_iou_labels(pieces, binary, 65)
        vote(out.reshape(2, -1, 64), 4, 0.56, 255)
    assert torch.equal(out, ref)
    assert c.total_syncs == 0, c.sync_ops
