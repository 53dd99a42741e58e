"""core.resize: kornia's resize with the reference's semantics, bit-identical to F.interpolate."""
import pytest
import torch
import torch.nn.functional as F

from pccfast.core.resize import resize

# (input (H, W), output (h, w)) as used in the package: layer grids to the labelling grid,
# grid to image, non-square, downscale, odd factors
SHAPES = [
    ((16, 16), (64, 64)), ((32, 32), (64, 64)), ((64, 64), (64, 64)), ((64, 64), (512, 512)),
    ((16, 16), (40, 40)), ((24, 32), (96, 64)), ((64, 64), (16, 16)), ((512, 512), (64, 64)),
    ((37, 53), (20, 11)), ((7, 5), (21, 35)),
]


def _reference(x, size, mode):
    """F.interpolate on the same 4-D tensor kornia hands over."""
    y = x if x.ndim == 4 else x.reshape(-1, *x.shape[-3:]) if x.ndim > 4 else x.reshape(1, -1, *x.shape[-2:])
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(y, size=size, mode=mode, **kw).reshape(*x.shape[:-2], *size)


@pytest.mark.parametrize("src,size", SHAPES)
@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_value_float_matches_interpolate(device, src, size, mode):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, *src, generator=gen).to(device)  # (B, C, H, W): C = 7 like token maps
    y = resize(x, size, mode)
    assert y.shape == (2, 7, *size) and y.dtype == x.dtype
    assert torch.equal(y, _reference(x, size, mode))


@pytest.mark.parametrize("shape", [(16, 16), (5, 16, 16), (2, 3, 4, 16, 16)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_leading_dims(device, shape, mode):
    """(H, W), (C, H, W) and (*, C, H, W) give F.interpolate's values on kornia's 4-D fold."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1)).to(device)
    y = resize(x, (24, 40), mode)
    assert y.shape == (*shape[:-2], 24, 40)
    assert torch.equal(y, _reference(x, (24, 40), mode))


def test_four_d_input_is_not_refolded():
    """Regression: torch's CPU bilinear kernel rounds (B, C) planes differently (up to 1 ulp)
    from (B*C, 1) ones; a helper that refolded (B, T, h, w) token maps changed OVAM sums."""
    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    want = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(resize(x, (64, 64)), want)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.int32, torch.int16, torch.bool])
@pytest.mark.parametrize("src,size", SHAPES)
def test_value_integer_nearest(device, dtype, src, size):
    """Label masks keep dtype and values; the pixels are those F.interpolate's nearest picks."""
    gen = torch.Generator().manual_seed(3)
    hi = 2 if dtype == torch.bool else 256 if dtype == torch.uint8 else 30000
    x = torch.randint(0, hi, (3, *src), generator=gen).to(device=device, dtype=dtype)  # (B, H, W)
    y = resize(x, size, "nearest")
    assert y.dtype == dtype and y.shape == (3, *size) and y.device == x.device
    want = F.interpolate(x[:, None].double(), size=size, mode="nearest")[:, 0].to(dtype)  # exact below 2**53
    assert torch.equal(y, want)


def test_int64_values_beyond_float_precision():
    x = torch.tensor([[2**62 + 1, -(2**61) - 3], [7, 2**53 + 1]], dtype=torch.int64)
    y = resize(x, (4, 4), "nearest")
    assert torch.equal(y, x.repeat_interleave(2, 0).repeat_interleave(2, 1))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize("factor", [1, 2, 3, 4, 5, 7, 8, 11])
def test_whole_factor_nearest_is_repeat_interleave(dtype, factor):
    """What labeller's blocky upsampling (64 -> 512) and the PCA's grid upsampling did before."""
    x = torch.randint(0, 256, (2, 13, 9), generator=torch.Generator().manual_seed(4)).to(dtype)
    want = x.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    assert torch.equal(resize(x, (13 * factor, 9 * factor), "nearest"), want)


def test_value_hand_made():
    x = torch.tensor([[[1, 2], [3, 4]]], dtype=torch.uint8)
    assert resize(x, (4, 6), "nearest").tolist() == [[[1, 1, 1, 2, 2, 2]] * 2 + [[3, 3, 3, 4, 4, 4]] * 2]
    # bilinear, align_corners=False: half-pixel centres, edges clamped
    y = resize(torch.tensor([[0.0, 4.0]]), (1, 4))
    assert y.tolist() == [[0.0, 1.0, 3.0, 4.0]]


def test_uint8_bilinear_and_half_precision():
    x = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(resize(x, (40, 24)), _reference(x, (40, 24), "bilinear"))
    h = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    y = resize(h, (64, 64))
    assert y.dtype == torch.bfloat16 and torch.equal(y, _reference(h, (64, 64), "bilinear"))


def test_smoke_shapes():
    assert resize(torch.zeros(0, 3, 4, 4), (8, 8)).shape == (0, 3, 8, 8)
    assert resize(torch.zeros(0, 4, 4, dtype=torch.long), (8, 8), "nearest").shape == (0, 8, 8)
    x = torch.rand(4, 4)
    y = resize(x, torch.Size([4, 4]), "nearest")
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()  # a new tensor


def test_exception():
    x = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match=r"`mode` has to be one of \('bilinear', 'bicubic', 'nearest'\) but is 'area'"):
        resize(x, (8, 8), "area")
    with pytest.raises(TypeError, match=r"`x` has to be floating point for mode 'bicubic' but has dtype torch.uint8"):
        resize(x.to(torch.uint8), (8, 8), "bicubic")
    for bad in [(0, 8), (8,), (8, 8, 8), 8, (8.0, 8), (True, 8), None]:
        with pytest.raises(ValueError, match=r"`size` has to be a pair of positive ints \(h, w\) but is "):
            resize(x, bad)
    with pytest.raises(ValueError, match=r"`size` has to be a pair of positive ints \(h, w\) but is \(-1, 8\)"):
        resize(x, (-1, 8))
    with pytest.raises(ValueError, match=r"`x` has to have at least 2 dimensions \(\*, H, W\) but has shape \(4,\)"):
        resize(torch.zeros(4), (8, 8))
    with pytest.raises(ValueError, match=r"`x` has to have H and W of at least 1 but has shape \(2, 0, 4\)"):
        resize(torch.zeros(2, 0, 4), (8, 8))
    with pytest.raises(TypeError, match=r"`x` has to be a torch.Tensor but is list"):
        resize([[1.0]], (8, 8))
    with pytest.raises(TypeError, match=r"`x` has to be floating point or uint8 for mode 'bilinear' but has "
                                        r"dtype torch.int64"):
        resize(torch.zeros(2, 4, 4, dtype=torch.long), (8, 8))
    with pytest.raises(TypeError, match=r"`x` has to be a real tensor but has dtype torch.complex64"):
        resize(torch.zeros(2, 4, 4, dtype=torch.complex64), (8, 8), "nearest")


def test_whole_factor_nearest_into_out_view():
    """Regression: the PCA writes layer maps into a channel slice of the feature tensor; the
    whole-factor path copies into that view (no intermediate), equal to F.interpolate."""
    x = torch.randn(2, 6, 16, 16, generator=torch.Generator().manual_seed(11))
    big = torch.zeros(2, 10, 64, 64)
    got = resize(x, (64, 64), "nearest", out=big[:, 2:8])
    assert got.data_ptr() == big[:, 2:8].data_ptr()
    assert torch.equal(big[:, 2:8], _reference(x, (64, 64), "nearest"))
    assert not big[:, :2].any() and not big[:, 8:].any()
    odd = torch.empty(2, 6, 40, 40)
    assert torch.equal(resize(x, (40, 40), "nearest", out=odd), _reference(x, (40, 40), "nearest"))
    with pytest.raises(ValueError, match=r"`out` has to have shape \(2, 6, 64, 64\) but has shape \(2, 6, 32, 32\)"):
        resize(x, (64, 64), "nearest", out=torch.empty(2, 6, 32, 32))
