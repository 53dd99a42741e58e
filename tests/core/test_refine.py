import numpy as np
import pytest
import torch
from scipy import ndimage

from pccfast.backends import native, resolve
from pccfast.core.config import PCCConfig
from pccfast.core.refine import (cleanup, dilate, erode, piece_majority, pool_small_pieces,
                            refine_mask, refine_points)

SQUARE = np.ones((3, 3), bool)
HAVE_NATIVE = native.available("morphology", warn=False)
needs_native = pytest.mark.skipif(not HAVE_NATIVE, reason="the C clean-up kernel (kernels/morphology.c) does not "
                                  "build or load here (no C compiler or PCCFAST_NATIVE=0)")
BACKENDS = ["torch", pytest.param("native", marks=needs_native)]


def _morph(m, iterations, erosion):
    if iterations == 0:  # scipy's iterations=0 means "until nothing changes"
        return m
    if erosion:
        return ndimage.binary_erosion(m, SQUARE, iterations=iterations, border_value=1)
    return ndimage.binary_dilation(m, SQUARE, iterations=iterations, border_value=0)


def _cleanup_reference(lab, cfg):
    """The reference loop, literally, with scipy morphology in OpenCV's border convention."""
    out = np.zeros_like(lab)
    for v in np.unique(lab):
        if v in (0, cfg.ignore_index):
            out[lab == v] = v
            continue
        m = _morph(lab == v, cfg.erode_first, True)
        m = _morph(m, cfg.dilate_iters, False)
        m = _morph(m, cfg.erode_after, True)
        band = _morph(m, cfg.band_dilations, False)
        out[band] = cfg.ignore_index
        out[m] = v
    return out


def _blobby_labels(seed, h=48, w=64, values=(0, 1, 3, 7, 255)):
    rng = np.random.default_rng(seed)
    coarse = rng.choice(values, size=(h // 8, w // 8))
    lab = ndimage.zoom(coarse, 8, order=0)
    noise = rng.random((h, w)) < 0.03
    return np.where(noise, rng.choice(values, size=(h, w)), lab)


def test_refine_points_value():
    img = torch.arange(3 * 2 * 4, dtype=torch.uint8).view(1, 3, 2, 4)
    p = refine_points(img)
    assert p.shape == (1, 8, 5)
    # pixel (row 1, col 2): RGB then x * 255 / W, y * 255 / H
    assert torch.allclose(p[0, 6], torch.tensor([6.0, 14.0, 22.0, 2 * 255 / 4, 1 * 255 / 2]))


def test_pool_small_pieces_value():
    pieces = torch.tensor([[1, 1, 1, 2, 3, 3, 3, 4]])
    assert pool_small_pieces(pieces, 3).tolist() == [[1, 1, 1, 0, 3, 3, 3, 0]]


def test_piece_majority_value():
    #            piece 0 (pool): single label 4 | piece 1: 5x1, 2x2 -> 1 (5 > 4)
    # piece 2: 4x1, 2x2 -> 255 (4 is not > 4) | piece 3: 3x255, 1x2 -> 255 dominates | piece 4: 2:2 tie
    pieces = torch.tensor([[0, 0] + [1] * 7 + [2] * 6 + [3] * 4 + [4] * 4])
    labels = torch.tensor([[4, 4] + [1] * 5 + [2] * 2 + [1] * 4 + [2] * 2 + [255] * 3 + [2] + [5, 5, 6, 6]])
    out = piece_majority(pieces, labels, 2.0, 255)
    expect = [4, 4] + [1] * 7 + [255] * 6 + [255] * 4 + [255] * 4
    assert out.tolist() == [expect]
    assert piece_majority(pieces, torch.full_like(labels, 3), 2.0, 255).eq(3).all()


def test_morphology_border_convention():
    m = torch.zeros(1, 1, 6, 6)
    m[..., :3, :] = 1.0  # top half
    e = erode(m, 1)[0, 0]
    assert e[0].eq(1).all() and e[1, 0] == 1 and e[2].eq(0).all()  # border rows/cols never erode
    d = dilate(m, 2)[0, 0]
    assert d[:5].eq(1).all() and d[5].eq(0).all()
    ref = ndimage.binary_dilation(m[0, 0].numpy() > 0, SQUARE, iterations=2, border_value=0)
    assert np.array_equal(d.numpy() > 0, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_value(backend):
    """A thin class-1 line is opened away (stays 0, no band); a class-2 block keeps its core with a
    255 band around the part the opening trimmed; the 255 pixel is copied last."""
    lab = torch.zeros(1, 16, 16, dtype=torch.long)
    lab[0, 2, :] = 1  # 1-pixel line: removed by the first erosion
    lab[0, 8:16, 8:16] = 2  # 8x8 block touching the border
    lab[0, 0, 0] = 255
    out = cleanup(lab, PCCConfig(cleanup_backend=backend))[0]
    assert (out[2] == 0).all()
    assert (out[8:16, 8:16] == 2).all()
    assert (out[6:8, 6:16] == 255).all() and (out[5] == 0).all()  # 2-pixel band from dilate x2
    assert out[0, 0] == 255


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cleanup_matches_sequential_reference(seed, backend):
    cfg = PCCConfig(cleanup_backend=backend)
    labs = np.stack([_blobby_labels(seed), _blobby_labels(seed + 10)])
    out = cleanup(torch.from_numpy(labs), cfg).numpy()
    for i in range(2):
        assert np.array_equal(out[i], _cleanup_reference(labs[i], cfg))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_other_settings_match_reference(backend):
    cfg = PCCConfig(erode_first=0, dilate_iters=2, erode_after=1, band_dilations=1, cleanup_backend=backend)
    lab = _blobby_labels(5, values=(0, 2, 4, 255))
    out = cleanup(torch.from_numpy(lab)[None], cfg)[0].numpy()
    assert np.array_equal(out, _cleanup_reference(lab, cfg))


def _piecewise_labels(seed, b, h, w, values=(0, 1, 2, 5, 9, 255)):
    """(B, H, W) long piecewise label maps: random blocks of random size (objects touching the
    border), salt noise (single pixels), 1-pixel lines, 2-pixel lines; the last image all 0."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor(values)
    lab = torch.zeros(b, h, w, dtype=torch.long)
    for i in range(b - 1):
        for _ in range(int(torch.randint(1, 8, (1,), generator=g))):
            y0, y1 = sorted(torch.randint(-h // 4, h + h // 4, (2,), generator=g).tolist())
            x0, x1 = sorted(torch.randint(-w // 4, w + w // 4, (2,), generator=g).tolist())
            lab[i, max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = vals[torch.randint(0, len(vals), (1,), generator=g)]
        lab[i, int(torch.randint(0, h, (1,), generator=g)), :] = vals[1]  # 1-pixel line
        lab[i, :, int(torch.randint(0, w, (1,), generator=g))] = vals[-2]
        c = int(torch.randint(0, max(w - 1, 1), (1,), generator=g))
        lab[i, :, c:c + 2] = vals[2]  # 2-pixel line
        noise = torch.rand(h, w, generator=g) < 0.02
        lab[i] = torch.where(noise, vals[torch.randint(0, len(vals), (h, w), generator=g)], lab[i])
    return lab


def _sparse_labels(seed, b, h, w, values=(1, 2, 5, 9, 255)):
    """(B, H, W) long maps of a few objects on 0 away from the borders (each value's rows cover
    part of the image only): blocks, discs, short lines, single pixels; the last image all 0."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor(values)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (H, W) each
    lab = torch.zeros(b, h, w, dtype=torch.long)
    for i in range(b - 1):
        for j in range(int(torch.randint(1, 5, (1,), generator=g))):
            v = vals[torch.randint(0, len(vals), (1,), generator=g)]
            cy, cx = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
            r = int(torch.randint(1, max(min(h, w) // 4, 2), (1,), generator=g))
            if j % 3 == 0:
                lab[i, max(cy - r, 0):cy + r, max(cx - r, 0):cx + r] = v
            elif j % 3 == 1:
                lab[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = v
            else:
                lab[i, cy, max(cx - 2 * r, 0):cx + 2 * r] = v  # short 1-pixel line
        lab[i, int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))] = vals[0]
    return lab


# (erode_first, dilate_iters, erode_after, band_dilations); the last three test the kernel's row bounds
ITERATIONS = [(1, 5, 4, 2), (0, 0, 0, 0), (0, 2, 1, 1), (2, 3, 1, 0), (1, 0, 3, 3), (3, 7, 0, 2), (2, 0, 1, 0),
              (0, 2, 4, 0), (0, 1, 0, 3)]
SHAPES = [(17, 64), (40, 129), (65, 31), (1, 70), (23, 1), (2, 2), (96, 72)]


@needs_native
@pytest.mark.parametrize("make", [_piecewise_labels, _sparse_labels])
@pytest.mark.parametrize("iters", ITERATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cleanup_native_equals_torch(shape, iters, make):
    h, w = shape
    cfg = PCCConfig(erode_first=iters[0], dilate_iters=iters[1], erode_after=iters[2], band_dilations=iters[3])
    lab = make(h * 1000 + w + sum(iters), 4, h, w)
    ref = cleanup(lab, cfg.replace(cleanup_backend="torch"))
    out = cleanup(lab, cfg.replace(cleanup_backend="native"))
    assert out.dtype == torch.uint8 and out.shape == lab.shape
    assert torch.equal(out, ref)
    assert out[-1].eq(0).all()  # the all-0 image


@needs_native
def test_cleanup_native_threads():
    """Both thread layouts of the kernel give the torch result: one image per thread (at least
    as many images as threads) and every phase spread over the threads (fewer images)."""
    lab = torch.cat([_sparse_labels(11, 3, 40, 70), _piecewise_labels(12, 3, 40, 70)])  # (6, 40, 70)
    cfg = PCCConfig()
    ref = cleanup(lab, cfg.replace(cleanup_backend="torch"))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for b in (1, 2, 6):
            assert torch.equal(cleanup(lab[:b], cfg.replace(cleanup_backend="native")), ref[:b])
            assert torch.equal(cleanup(lab[3:3 + b], cfg.replace(cleanup_backend="native")), ref[3:3 + b])
    finally:
        torch.set_num_threads(old)


@needs_native
def test_cleanup_native_other_values_and_ignore():
    """Labels outside [0, 255] (the kernel's sorted-values path; the uint8 cast wraps as torch's)
    and an uncertain label that is not the largest value."""
    lab = _piecewise_labels(7, 3, 48, 80, values=(0, -4, 1, 3, 255, 300, 7))
    for ignore in (255, 3):
        cfg = PCCConfig(ignore_index=ignore)
        ref = cleanup(lab, cfg.replace(cleanup_backend="torch"))
        assert torch.equal(cleanup(lab, cfg.replace(cleanup_backend="native")), ref)
    lab = _piecewise_labels(8, 3, 48, 80, values=(0, 1, 3, 200, 7))
    cfg = PCCConfig(ignore_index=3)
    assert torch.equal(cleanup(lab, cfg.replace(cleanup_backend="native")),
                       cleanup(lab, cfg.replace(cleanup_backend="torch")))
    small = lab.to(torch.int32)  # other integer dtypes
    assert torch.equal(cleanup(small, cfg.replace(cleanup_backend="native")),
                       cleanup(lab, cfg.replace(cleanup_backend="torch")))


@needs_native
@pytest.mark.parametrize("shape", [(0, 8, 8), (2, 0, 5), (2, 5, 0)])
def test_cleanup_native_empty(shape):
    lab = torch.zeros(shape, dtype=torch.long)
    out = cleanup(lab, PCCConfig(cleanup_backend="native"))
    assert out.shape == shape and out.dtype == torch.uint8
    lab = torch.zeros(2, 9, 9, dtype=torch.long)  # no value but 0
    assert cleanup(lab, PCCConfig(cleanup_backend="native")).eq(0).all()


@needs_native
def test_cleanup_auto_is_native_on_cpu():
    lab = _piecewise_labels(3, 3, 30, 50)
    assert resolve("cleanup", "auto", lab) == "native"
    assert torch.equal(cleanup(lab, PCCConfig()), cleanup(lab, PCCConfig(cleanup_backend="native")))


def test_cleanup_backend_exceptions():
    lab = torch.zeros(1, 4, 4, dtype=torch.long)
    cfg = PCCConfig()
    cfg.cleanup_backend = "fast"  # bypasses the config's own check
    with pytest.raises(ValueError, match=r"`cleanup_backend` has to be one of 'auto', 'torch', 'native' but is 'fast'"):
        cleanup(lab, cfg)
    with pytest.raises(ValueError, match=r"cleanup backend 'native' runs on the CPU but the input is on meta"):
        cleanup(lab.to("meta"), PCCConfig(cleanup_backend="native"))
    assert resolve("cleanup", "auto", lab.to("meta")) == "torch"


def _scene(h=128, w=128):
    """Two coloured rectangles on a grey background and a blocky guess of them (8x8 blocks)."""
    img = torch.full((1, 3, h, w), 120.0)
    img[0, :, 20:70, 16:60] = torch.tensor([220.0, 40.0, 40.0])[:, None, None]
    img[0, :, 60:110, 75:120] = torch.tensor([30.0, 60.0, 210.0])[:, None, None]
    img += torch.randn(img.shape, generator=torch.Generator().manual_seed(0)) * 4
    truth = torch.zeros(h, w, dtype=torch.long)
    truth[20:70, 16:60] = 3
    truth[60:110, 75:120] = 8
    blocky = torch.zeros(h // 8, w // 8, dtype=torch.uint8)
    blocky[3:9, 2:7] = 3  # rows 24..72, cols 16..56: shifted against the object
    blocky[7:14, 9:15] = 8
    blocky[2, 2:7] = 255  # an uncertain strip
    full = blocky.repeat_interleave(8, 0).repeat_interleave(8, 1)[None]
    return img.clamp(0, 255), full, truth


def test_refine_mask_recovers_objects(device):
    img, full, truth = _scene()
    out = refine_mask(img.to(device), full.to(device))[0].cpu()
    assert out.dtype == torch.uint8
    for c in (3, 8):
        inter = ((out == c) & (truth == c)).sum()
        union = ((out == c) | (truth == c)).sum()
        assert inter / union > 0.85, c
    assert ((out == 0) & (truth == 0)).sum() / (truth == 0).sum() > 0.85


def test_refine_uint8_equals_float():
    img, full, _ = _scene(64, 64)
    a = refine_mask(img.round().to(torch.uint8), full)
    b = refine_mask(img.round(), full)
    assert torch.equal(a, b)


def test_exceptions():
    img, full, _ = _scene(64, 64)
    with pytest.raises(ValueError, match=r"`blocky_full` has to have batch size 1 \(dimension 0\) but has shape \(2, 64, 64\)"):
        refine_mask(img, full.repeat(2, 1, 1))
    with pytest.raises(ValueError, match=r"have to agree but have shapes \(1, 3, 64, 64\) and \(1, 32, 32\)"):
        refine_mask(img, full[:, :32, :32])
    with pytest.raises(TypeError, match="`blocky_full` has to be an integer tensor but has dtype torch.float32"):
        refine_mask(img, full.float())


def test_refine_stage_syncs_bounded():
    """Regression: pooling sized its table by ``int(pieces.max())`` and the majority took the
    label range, a ``bincount``, a ``nonzero`` and the piece count, one host sync each (6);
    the clean-up dropped 0 with a boolean mask. Now pooling has a static table (no sync),
    the majority reads its sizes back in one sync, and the clean-up only its ``unique``."""
    from pccfast.testing.counting import OpCounter
    g = torch.Generator().manual_seed(1)
    pieces = torch.randint(1, 40, (2, 32 * 32), generator=g)  # (B, P)
    labels = torch.tensor([0, 3, 7, 255])[torch.randint(0, 4, (2, 32 * 32), generator=g)]  # (B, P)
    ref = piece_majority(pool_small_pieces(pieces, 25), labels, 2.0, 255)
    ref_clean = cleanup(ref.view(2, 32, 32), PCCConfig(cleanup_backend="torch"))
    with OpCounter() as c:
        with c.section("pool"):
            pooled = pool_small_pieces(pieces, 25, 32 * 32 + 1)
        with c.section("majority"):
            out = piece_majority(pooled, labels, 2.0, 255)
        with c.section("cleanup"):
            clean = cleanup(out.view(2, 32, 32), PCCConfig(cleanup_backend="torch"))
    assert torch.equal(out, ref) and torch.equal(clean, ref_clean)
    assert c.syncs["pool"] == 0 and c.syncs["majority"] <= 1 and c.syncs["cleanup"] <= 1, c.sync_ops
