import importlib.util

import numpy as np
import pytest
import torch
from scipy import ndimage

from pccfast.backends import native, resolve
from pccfast.core.components import _resolve, connected_components

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
    with pytest.raises(ValueError, match="`backend` has to be one of 'auto', 'torch', 'native', 'cupy' but is 'scipy'"):
        connected_components(torch.zeros(1, 3, 3, dtype=torch.long), backend="scipy")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_cupy_missing_message():
    with pytest.raises(ImportError, match="pip install cupy-cuda12x"):
        connected_components(torch.zeros(1, 3, 3, dtype=torch.long), backend="cupy")


# --- the C kernel (backend "native") -------------------------------------------------------

needs_native = pytest.mark.skipif(not native.available("components", warn=False),
                                  reason="the C kernel kernels/components.c cannot be built here (no C compiler?)")


def _blobs(rng, b, h, w, k, cell):
    """Piecewise-constant maps: k labels on a coarse grid, nearest-upsampled, with a little
    noise; (b, h, w) int64."""
    coarse = rng.integers(0, k, size=(b, -(-h // cell), -(-w // cell)))
    lab = coarse.repeat(cell, 1).repeat(cell, 2)[:, :h, :w].copy()
    flip = rng.random(lab.shape) < 0.05
    lab[flip] = rng.integers(0, k, size=int(flip.sum()))
    return lab


def _native_equals_torch(lab, connectivity):
    t = torch.from_numpy(np.ascontiguousarray(lab))
    ours = connected_components(t, connectivity, backend="native")
    ref = connected_components(t, connectivity, backend="torch")
    assert ours.dtype == torch.long and ours.shape == t.shape
    assert torch.equal(ours, ref)
    return ours


@needs_native
@pytest.mark.parametrize("connectivity", [4, 8])
def test_native_equals_torch_random(connectivity):
    rng = np.random.default_rng(10 + connectivity)
    _native_equals_torch(rng.integers(0, 2, size=(3, 37, 41)), connectivity)  # few labels, noise
    _native_equals_torch(rng.integers(0, 50, size=(2, 33, 29)), connectivity)  # many labels
    # more runs than the kernel's first guess (4096): its run arrays have to grow, twice
    _native_equals_torch(rng.integers(0, 50, size=(2, 90, 100)), connectivity)
    _native_equals_torch(_blobs(rng, 4, 64, 80, 20, 7), connectivity)  # blobs of various sizes
    masked = _blobs(rng, 3, 40, 45, 5, 4)
    masked[rng.random(masked.shape) < 0.3] = -1  # masked pixels: id 0, connect to nothing
    masked[1] = -1  # an all-masked image
    out = _native_equals_torch(masked, connectivity).numpy()
    assert (out[masked < 0] == 0).all() and (out[masked >= 0] > 0).all()
    assert (out[1] == 0).all()


@needs_native
@pytest.mark.parametrize("connectivity", [4, 8])
def test_native_spiral_snake_and_thin_shapes(connectivity):
    _native_equals_torch(np.stack([_spiral(63), 1 - _spiral(63)]), connectivity)
    _native_equals_torch(_snake(64, 64)[None], connectivity)
    _native_equals_torch(_snake(63, 5)[None], connectivity)
    # diagonal stripes: pieces touch only corner to corner (one piece per stripe at 8, many at 4)
    yy, xx = np.mgrid[:30, :30]
    _native_equals_torch(((xx + yy) % 3 == 0).astype(np.int64)[None], connectivity)
    _native_equals_torch(((xx - yy) % 2).astype(np.int64)[None], connectivity)  # checkerboard


@needs_native
@pytest.mark.parametrize("connectivity", [4, 8])
def test_native_edge_shapes(connectivity):
    rng = np.random.default_rng(3)
    for shape in [(2, 1, 17), (2, 17, 1), (1, 1, 1), (3, 2, 2)]:
        _native_equals_torch(rng.integers(-1, 3, size=shape), connectivity)
    one = connected_components(torch.tensor([[7]]), connectivity, backend="native")
    assert torch.equal(one, torch.tensor([[1]]))
    assert torch.equal(connected_components(torch.tensor([[-3]]), connectivity, backend="native"),
                       torch.tensor([[0]]))
    empty = connected_components(torch.zeros(0, 4, 5, dtype=torch.long), connectivity, backend="native")
    assert empty.shape == (0, 4, 5)


@needs_native
def test_native_value_hand_made():
    lab = torch.tensor([[0, 0, 1, 1],
                        [0, 1, 0, 1],
                        [2, 2, 0, 0]])
    assert torch.equal(connected_components(lab, 8, backend="native"),
                       torch.tensor([[1, 1, 2, 2], [1, 2, 1, 2], [3, 3, 1, 1]]))
    assert torch.equal(connected_components(lab, 4, backend="native"),
                       torch.tensor([[1, 1, 2, 2], [1, 3, 4, 2], [5, 5, 4, 4]]))


@needs_native
@pytest.mark.parametrize("connectivity", [4, 8])
def test_native_matches_scipy(connectivity):
    """Same partitions as scipy.ndimage.label per label value; with one label and the rest
    masked, the same ids."""
    rng = np.random.default_rng(20 + connectivity)
    lab = np.concatenate([_blobs(rng, 2, 48, 48, 6, 5), rng.integers(0, 3, size=(2, 48, 48))])
    ours = connected_components(torch.from_numpy(lab), connectivity, backend="native").numpy()
    for i in range(lab.shape[0]):
        ref, num = _scipy_pieces(lab[i], connectivity)
        assert _same_partition(ours[i], ref), f"image {i}"
        assert ours[i].max() == num and np.unique(ours[i]).size == num
    binary = rng.random((2, 40, 40)) < 0.45
    ours = connected_components(torch.from_numpy(np.where(binary, 4, -1)), connectivity, backend="native").numpy()
    for i in range(2):
        assert np.array_equal(ours[i], ndimage.label(binary[i], structure=STRUCT[connectivity])[0])


@needs_native
def test_native_threads_and_dtypes():
    """The result does not depend on the thread count, the batch split, or the input dtype."""
    rng = np.random.default_rng(5)
    lab = torch.from_numpy(_blobs(rng, 5, 50, 60, 8, 6))
    ref = connected_components(lab, 8, backend="torch")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(connected_components(lab, 8, backend="native"), ref)
    finally:
        torch.set_num_threads(before)
    for i in range(5):
        assert torch.equal(connected_components(lab[i], 8, backend="native"), ref[i])
    assert torch.equal(connected_components(lab.to(torch.uint8), 8, backend="native"), ref)
    assert torch.equal(connected_components(lab.to(torch.int32).transpose(1, 2), 8, backend="native"),
                       connected_components(lab.transpose(1, 2), 8, backend="torch"))  # non-contiguous
    assert torch.equal(connected_components(lab.view(5, 1, 50, 60), 8, backend="native")[:, 0], ref)


@needs_native
def test_auto_on_cpu_is_native():
    assert _resolve("auto", torch.zeros(2, 2, dtype=torch.long)) == "native"
    lab = torch.from_numpy(_blobs(np.random.default_rng(1), 2, 30, 30, 5, 4))
    assert torch.equal(connected_components(lab, 8, backend="auto"), connected_components(lab, 8, backend="native"))


def test_resolve_backend():
    lab = torch.zeros(2, 2, dtype=torch.long)
    assert _resolve("torch", lab) == "torch"
    assert _resolve("auto", lab) == ("native" if native.available("components", warn=False) else "torch")
    assert _resolve("auto", lab) == resolve("components", "auto", lab)
    with pytest.raises(ValueError, match="`backend` has to be one of 'auto', 'torch', 'native', 'cupy' but is 'c'"):
        connected_components(lab, backend="c")


def test_too_large_for_native():
    """The kernel numbers runs with int32: images of 2^31 - 1 pixels or more go to torch."""
    big = torch.zeros(1, 1, 1, dtype=torch.long).expand(1, 2**16, 2**15)  # (1, H, W), no memory
    assert _resolve("auto", big) == "torch"
    with pytest.raises(ValueError, match="takes images of fewer than 2.31 - 1 pixels but they are 65536 x 32768"):
        connected_components(big, backend="native")


def test_native_disabled_falls_back(monkeypatch):
    """PCCFAST_NATIVE=0: "auto" uses torch, "native" raises NativeUnavailable naming the switch."""
    monkeypatch.setenv("PCCFAST_NATIVE", "0")
    lab = torch.tensor([[0, 1], [1, 1]])
    assert _resolve("auto", lab) == "torch"
    assert torch.equal(connected_components(lab, 4, backend="auto"), torch.tensor([[1, 2], [2, 2]]))
    with pytest.raises(native.NativeUnavailable, match="PCCFAST_NATIVE=0"):
        connected_components(lab, backend="native")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_native_rejects_gpu_tensors():
    with pytest.raises(ValueError, match="components backend 'native' runs on the CPU but the input is on cuda"):
        connected_components(torch.zeros(1, 3, 3, dtype=torch.long, device="cuda"), backend="native")


def test_schedule_does_not_change_ids():
    """The fixed schedule (rounds between host checks) and the pair list's shape never change
    the ids: the fixed point is unique (every piece one tree rooted at its first pixel)."""
    from pccfast.core.components import _components_torch
    rng = np.random.default_rng(3)
    for lab in (torch.from_numpy(rng.integers(0, 3, size=(2, 37, 41))), torch.from_numpy(_spiral(23))[None],
                torch.from_numpy(_snake(15, 12))[None]):
        ref = _components_torch(lab, 8)
        for rounds in (1, 2, 7, 64):
            for compact in (True, False):
                assert torch.equal(_components_torch(lab, 8, rounds, compact), ref)
        expected, n = _scipy_pieces(lab[0].numpy(), 8)
        assert _same_partition(ref[0].numpy(), expected) and int(ref[0].max()) == n


def test_syncs_bounded():
    """Regression: the torch path synchronised with the host once per pointer jump
    (``torch.equal``) and per hook round (mask indexing, ``bool``): about 136 syncs for the
    components of a batch of 8 SD-sized images. Now one ``nonzero`` (CPU only) and one check
    per block of rounds, the blocks doubling: O(log rounds) even for a spiral."""
    from pccfast.core.components import _components_torch
    from pccfast.testing.counting import OpCounter
    rng = np.random.default_rng(4)
    lab = torch.from_numpy(rng.integers(0, 4, size=(8, 64, 64)))
    for compact, most in ((True, 4), (False, 3)):
        with OpCounter() as c:
            _components_torch(lab, 8, compact=compact)
        assert c.total_syncs <= most, c.sync_ops
    spiral = torch.from_numpy(_spiral(41))[None]  # hundreds of pixels in one chain
    with OpCounter() as c:
        out = _components_torch(spiral, 8, compact=False)
    assert c.total_syncs <= 8, c.sync_ops
    assert _same_partition(out[0].numpy(), _scipy_pieces(spiral[0].numpy(), 8)[0])
