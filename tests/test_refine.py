import numpy as np
import pytest
import torch
from scipy import ndimage

from pccfast.config import PCCConfig
from pccfast.refine import (cleanup, dilate, erode, piece_majority, pool_small_pieces, refine_mask,
                            refine_points)

SQUARE = np.ones((3, 3), bool)


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


def test_cleanup_value():
    """A thin class-1 line is opened away (stays 0, no band); a class-2 block keeps its core with a
    255 band around the part the opening trimmed; the 255 pixel is copied last."""
    lab = torch.zeros(1, 16, 16, dtype=torch.long)
    lab[0, 2, :] = 1  # 1-pixel line: removed by the first erosion
    lab[0, 8:16, 8:16] = 2  # 8x8 block touching the border
    lab[0, 0, 0] = 255
    out = cleanup(lab, PCCConfig())[0]
    assert (out[2] == 0).all()
    assert (out[8:16, 8:16] == 2).all()
    assert (out[6:8, 6:16] == 255).all() and (out[5] == 0).all()  # 2-pixel band from dilate x2
    assert out[0, 0] == 255


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cleanup_matches_sequential_reference(seed):
    cfg = PCCConfig()
    labs = np.stack([_blobby_labels(seed), _blobby_labels(seed + 10)])
    out = cleanup(torch.from_numpy(labs), cfg).numpy()
    for i in range(2):
        assert np.array_equal(out[i], _cleanup_reference(labs[i], cfg))


def test_cleanup_other_settings_match_reference():
    cfg = PCCConfig(erode_first=0, dilate_iters=2, erode_after=1, band_dilations=1)
    lab = _blobby_labels(5, values=(0, 2, 4, 255))
    out = cleanup(torch.from_numpy(lab)[None], cfg)[0].numpy()
    assert np.array_equal(out, _cleanup_reference(lab, cfg))


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
