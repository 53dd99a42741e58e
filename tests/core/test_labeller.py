import math

import pytest
import torch

from pccfast.core.config import PCCConfig
from pccfast.core.labeller import Labeller, LabelResult, label_images


def _scene(b=1, grid=64, size=256, d=24, k=21, seed=0):
    """Planted objects: a disc (class 5), a rectangle (class 12) and, in image 1, a triangle
    (class 3). Features: D channels with a distinct mean per object plus noise; class maps:
    smooth blobs over the objects (background map = 1 - objects); colours: distinct + noise."""
    g = torch.Generator().manual_seed(seed)
    feats, cams, imgs, truths = [], [], [], []
    for i in range(b):
        yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        yy, xx = yy / size, xx / size  # in (0, 1)
        truth = torch.zeros(size, size, dtype=torch.long)
        truth[(xx - 0.3 - 0.05 * i) ** 2 + (yy - 0.35) ** 2 < 0.18 ** 2] = 5
        truth[(xx > 0.55) & (xx < 0.9) & (yy > 0.45) & (yy < 0.85)] = 12
        if i == 1:
            truth[(yy > 0.6) & (yy < 0.95) & (xx > 0.1) & (xx - 0.1 < (yy - 0.6))] = 3
        classes = truth.unique().tolist()
        # features on the grid (nearest downsample of the truth)
        small = truth[size // grid // 2::size // grid, size // grid // 2::size // grid]  # (grid, grid)
        means = torch.randn(256, d, generator=g) * 2
        f = means[small].permute(2, 0, 1) + 0.5 * torch.randn(d, grid, grid, generator=g)
        # class maps: blurred object masks (box blur of the grid mask) + a little noise
        cam = torch.zeros(k, grid, grid)
        for c in classes:
            m = (small == c).float()[None, None]
            blur = torch.nn.functional.avg_pool2d(m, 7, stride=1, padding=3, count_include_pad=False)[0, 0]
            cam[c] = blur
        cam[0] = 1.0 - cam[1:].amax(0)
        cam = cam + 0.02 * torch.rand(k, grid, grid, generator=g) * (cam.amax((1, 2), keepdim=True) > 0)
        # colours
        palette = torch.rand(256, 3, generator=g) * 200 + 20
        palette[0] = torch.tensor([128.0, 128.0, 128.0])
        img = palette[truth].permute(2, 0, 1) + 6 * torch.randn(3, size, size, generator=g)
        feats.append(f)
        cams.append(cam)
        imgs.append(img.clamp(0, 255))
        truths.append(truth)
    return torch.stack(feats), torch.stack(cams), torch.stack(imgs), torch.stack(truths)


def _iou(a, b):
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def test_smoke(device):
    feats, cams, imgs, _ = _scene(grid=16, size=64)
    res = label_images(feats.to(device), cams.to(device), imgs.to(device))
    assert isinstance(res, LabelResult)
    assert res.mask.shape == (1, 64, 64) and res.mask.dtype == torch.uint8
    assert res.blocky.shape == (1, 16, 16) and res.blocky_full.shape == (1, 64, 64)
    assert res.mask.device.type == device.type


def test_synthetic_scene_recovers_objects():
    """Planted objects are recovered by the refined mask with IoU > 0.8 each (batch of 2)."""
    feats, cams, imgs, truths = _scene(b=2, grid=64, size=128)
    res = label_images(feats, cams, imgs.round().to(torch.uint8))
    for i in range(2):
        for c in truths[i].unique().tolist():
            iou = _iou(res.mask[i] == c, truths[i] == c)
            assert iou > 0.8, (i, c, iou)
        # the blocky mask is right too, at its resolution
        for c in (5, 12):
            assert _iou(res.blocky_full[i] == c, truths[i] == c) > 0.7


def test_refine_off_returns_blocky_full():
    feats, cams, imgs, _ = _scene(grid=16, size=64)
    res = label_images(feats, cams, imgs, PCCConfig(refine=False))
    assert torch.equal(res.mask, res.blocky_full)
    assert torch.equal(res.blocky_full, res.blocky.repeat_interleave(4, -2).repeat_interleave(4, -1))
    assert res.blocky_full.dtype == torch.uint8
    assert label_images(feats, cams, imgs, return_blocky=False).blocky is None


def test_labeller_class_is_thin():
    feats, cams, imgs, _ = _scene(grid=16, size=64)
    cfg = PCCConfig(refine=False)
    assert torch.equal(Labeller(cfg)(feats, cams, imgs).mask, label_images(feats, cams, imgs, cfg).mask)
    assert "refine=False" in repr(Labeller(cfg))


def test_exceptions():
    feats, cams, imgs, _ = _scene(grid=16, size=64)
    cases = [
        ((feats[0], cams, imgs), ValueError, r"`features` has to have 4 dimensions but has shape \(24, 16, 16\)"),
        ((feats, cams[:, :, None], imgs), ValueError, r"`class_attention` has to have 4 dimensions but has shape"),
        ((feats, cams.repeat(2, 1, 1, 1), imgs), ValueError,
         r"`class_attention` has to have batch size 1 \(dimension 0\) but has shape \(2, 21, 16, 16\)"),
        ((feats, cams, imgs.repeat(3, 1, 1, 1)), ValueError, r"`images` has to have batch size 1"),
        ((feats, cams[:, :0], imgs), ValueError, r"`class_attention` has to hold 1 to 255 classes \(dimension 1\) but holds 0"),
        ((feats, cams, imgs[..., :60]), ValueError,
         r"`images` height and width have to be multiples of the feature grid \(16, 16\) but are 64 and 60"),
        ((feats, cams[..., :8], imgs), ValueError, r"`class_attention` has to have the grid of `features`"),
        ((feats, cams, imgs[:, :2]), ValueError, r"`images` has to have 3 channels \(dimension 1\)"),
        ((feats, cams, imgs * 2), ValueError, r"`images` has to lie in \[0, 255\] but spans"),
        ((feats, cams, imgs.long()), TypeError, r"`images` has to be uint8 or floating point but has dtype torch.int64"),
        ((feats.long(), cams, imgs), TypeError, r"`features` has to be a floating-point tensor"),
    ]
    for args, err, msg in cases:
        with pytest.raises(err, match=msg):
            label_images(*args)
    bad = feats.clone()
    bad[0, 3, 2, 2] = math.nan
    bad[0, 4, 2, 2] = math.inf
    with pytest.raises(ValueError, match="`features` has to be finite but holds 2 NaN or inf values"):
        label_images(bad, cams, imgs)
    bad_cams = cams.clone()
    bad_cams[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="`class_attention` has to be finite but holds 1 NaN or inf values"):
        label_images(feats, bad_cams, imgs)


def test_input_checks_one_sync():
    """Regression: the finiteness checks synchronised once per tensor and the float images'
    range twice more (5 syncs for float images); now one read-back for all of them, and a
    failing flag still gives check_tensor's message."""
    from pccfast.core.labeller import _check_inputs
    from pccfast.testing.counting import OpCounter
    feats, cams, imgs = torch.rand(2, 4, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16) * 255
    with OpCounter() as c:
        _check_inputs(feats, cams, imgs, PCCConfig())
    assert c.total_syncs == 1, c.sync_ops
    bad = imgs.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="`images` has to be finite but holds 1 NaN or inf values"):
        _check_inputs(feats, cams, bad, PCCConfig())
    bad[0, 0, 0, 0] = -1.0
    with pytest.raises(ValueError, match=r"`images` has to lie in \[0, 255\] but spans \[-1, "):
        _check_inputs(feats, cams, bad, PCCConfig())


def test_default_generators_are_cpu_on_every_device():
    """Same seed, same masks on any device: the labeller's own generators (k-means++ and PCA
    draws) are CPU generators even for CUDA data, so the numbers drawn do not depend on the
    device (CUDA generators would draw others from the same seed)."""
    from pccfast.core.checks import local_generator

    for device in ("cpu", "cuda", "cuda:1", torch.device("meta")):
        g = local_generator(None, 7, device)
        assert g.device.type == "cpu" and g.initial_seed() == 7
    mine = torch.Generator().manual_seed(1)
    assert local_generator(mine, 7, "cuda") is mine
