import importlib.util

import numpy as np
import pytest
import torch
from scipy import ndimage

from pccfast.components import connected_components

STRUCT = {8: np.ones((3, 3), bool), 4: None}


def _scipy_pieces(lab, connectivity):
    """Reference: scipy.ndimage.label per label value, ids offset to be unique. (H, W) -> (H, W)."""
    out = np.zeros(lab.shape, np.int64)
    offset = 0
    for v in np.unique(lab[lab >= 0]):
        pieces, num = ndimage.label(lab == v, structure=STRUCT[connectivity])
        out[pieces > 0] = pieces[pieces > 0] + offset
        offset += num
    return out, offset


def _same_partition(a, b):
    """True when the two labellings define the same partition (a bijection between ids)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1).shape[1]
    return pairs == np.unique(a).size == np.unique(b).size


def _spiral(n):
    """A 1-pixel square spiral path (label 1) with 1-pixel gaps (label 0) on an n x n grid."""
    g = np.zeros((n, n), np.int64)
    y, x, dy, dx = 0, 0, 0, 1
    g[y, x] = 1
    while True:
        for _ in range(2):  # turn right at most once per step
            ny, nx, fy, fx = y + dy, x + dx, y + 2 * dy, x + 2 * dx
            blocked = not (0 <= ny < n and 0 <= nx < n) or (0 <= fy < n and 0 <= fx < n and g[fy, fx])
            if not blocked:
                break
            dy, dx = dx, -dy
        else:
            return g
        if g[ny, nx] or (0 <= fy < n and 0 <= fx < n and g[fy, fx]):
            return g
        y, x = ny, nx
        g[y, x] = 1


def _snake(h, w):
    """A serpentine 1-pixel path (label 2) through background (label 5)."""
    g = np.full((h, w), 5, np.int64)
    for r in range(0, h, 2):
        g[r, :] = 2
        if r + 1 < h:
            g[r + 1, w - 1 if (r // 2) % 2 == 0 else 0] = 2
    return g


def _check(lab, connectivity):
    ours = connected_components(torch.from_numpy(lab), connectivity).numpy()
    for i in range(lab.shape[0]):
        ref, num = _scipy_pieces(lab[i], connectivity)
        assert _same_partition(ours[i], ref), f"image {i}"
        assert ours[i].min() == 1 and ours[i].max() == num  # consecutive 1..N
        assert np.unique(ours[i]).size == num


def test_smoke(device):
    lab = torch.randint(0, 3, (2, 16, 16), device=device)
    out = connected_components(lab)
    assert out.shape == (2, 16, 16) and out.dtype == torch.long and out.device.type == device.type


def test_value_hand_made():
    lab = torch.tensor([[0, 0, 1, 1],
                        [0, 1, 0, 1],
                        [2, 2, 0, 0]])
    expect8 = torch.tensor([[1, 1, 2, 2],
                            [1, 2, 1, 2],  # the 0 at (1, 2) touches (0, 1) diagonally
                            [3, 3, 1, 1]])
    expect4 = torch.tensor([[1, 1, 2, 2],
                            [1, 3, 4, 2],
                            [5, 5, 4, 4]])
    assert torch.equal(connected_components(lab[None], 8)[0], expect8)
    assert torch.equal(connected_components(lab, 4), expect4)  # (H, W) input works too


@pytest.mark.parametrize("connectivity", [4, 8])
def test_random_maps_match_scipy(connectivity):
    rng = np.random.default_rng(connectivity)
    noisy = rng.integers(0, 4, size=(3, 40, 50))
    smooth = ndimage.zoom(rng.integers(0, 6, size=(3, 8, 10)), (1, 5, 5), order=0)
    _check(noisy, connectivity)
    _check(smooth, connectivity)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_spiral_and_snake_match_scipy(connectivity):
    """Long thin shapes need many propagation steps: the result must still be exact."""
    spirals = np.stack([_spiral(63), 1 - _spiral(63)])
    _check(spirals, connectivity)
    _check(_snake(64, 64)[None], connectivity)
    out = connected_components(torch.from_numpy(_snake(64, 64))[None], connectivity)[0]
    assert int(out[0, 0]) == int(out[62, 0]) or int(out[0, 0]) == int(out[62, 63])  # one snake


def test_matches_scipy_numbering_on_binary_masks():
    """With the background masked (-1), ids equal scipy's ids exactly (raster order of first pixel)."""
    rng = np.random.default_rng(0)
    binary = rng.random((2, 30, 30)) < 0.4
    lab = np.where(binary, 1, -1)
    ours = connected_components(torch.from_numpy(lab), 8).numpy()
    for i in range(2):
        ref, _ = ndimage.label(binary[i], structure=np.ones((3, 3), bool))
        assert np.array_equal(ours[i], ref)


def test_leading_dims_and_uint8():
    lab = torch.randint(0, 2, (2, 3, 10, 12), dtype=torch.uint8)
    out = connected_components(lab)
    assert out.shape == (2, 3, 10, 12)
    assert torch.equal(out[1, 2], connected_components(lab[1, 2]))


def test_exceptions():
    with pytest.raises(ValueError, match="`connectivity` has to be 4 or 8 but is 6"):
        connected_components(torch.zeros(1, 3, 3, dtype=torch.long), 6)
    with pytest.raises(TypeError, match="`labels` has to be an integer tensor but has dtype torch.float32"):
        connected_components(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match=r"at least 2 dimensions \(H, W\) but has shape \(3,\)"):
        connected_components(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="`backend` has to be 'torch' or 'cupy' but is 'scipy'"):
        connected_components(torch.zeros(1, 3, 3, dtype=torch.long), backend="scipy")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_cupy_missing_message():
    with pytest.raises(ImportError, match="pip install cupy-cuda12x"):
        connected_components(torch.zeros(1, 3, 3, dtype=torch.long), backend="cupy")
