"""Tests of the synthetic scene generator (pccfast.synthetic) and its scoring helpers."""
import pytest
import torch

from pccfast.testing.synthetic import layer_spec, make_scene, mask_miou, pixel_agreement, scene_features, stack_scenes

SMALL = dict(grid=16, image_size=64, heads=(2, 2, 1), head_dim=8)


def test_layer_spec_value():
    assert layer_spec(64) == [(16, 20)] * 3 + [(32, 10)] * 3 + [(64, 5)] * 3
    assert layer_spec(32, (4, 2, 1), 1) == [(8, 4), (16, 2), (32, 1)]


def test_smoke_shapes():
    s = make_scene(3, **SMALL)
    assert [tuple(x.shape) for x in s.layers] == [(4, 16, 8)] * 3 + [(4, 64, 8)] * 3 + [(2, 256, 8)] * 3
    assert all(x.dtype == torch.float32 for x in s.layers)
    assert s.class_attention.shape == (21, 16, 16) and s.class_attention.dtype == torch.float32
    assert s.image.shape == (3, 64, 64) and s.image.dtype == torch.uint8
    assert s.gt.shape == (64, 64) and s.gt.dtype == torch.uint8
    assert s.objects.shape == (64, 64)


def test_seeded():
    a, b, c = make_scene(5, **SMALL), make_scene(5, **SMALL), make_scene(6, **SMALL)
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x, y)
    assert torch.equal(a.class_attention, b.class_attention)
    assert torch.equal(a.image, b.image) and torch.equal(a.gt, b.gt)
    assert not torch.equal(a.image, c.image)
    assert not torch.equal(a.layers[-1], c.layers[-1])


def test_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    make_scene(0, **SMALL)
    assert torch.equal(torch.rand(3), before)


@pytest.mark.parametrize("seed", range(6))
def test_ground_truth_consistent(seed):
    s = make_scene(seed, grid=32, image_size=128, heads=(2, 2, 1), head_dim=16)
    n = len(s.object_classes)
    # the ground truth is the class of the visible object, every object is visible
    lut = torch.tensor([0] + s.object_classes, dtype=torch.uint8)
    assert torch.equal(s.gt, lut[s.objects])
    assert set(torch.unique(s.objects).tolist()) == set(range(n + 1))
    assert set(torch.unique(s.gt).tolist()) == {0, *s.classes}
    assert s.classes == sorted(set(s.object_classes)) and 0 not in s.classes
    # class maps: exactly the present classes (and background) are non-zero, all >= 0
    nonzero = (s.class_attention.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist()
    assert nonzero == [0, *s.classes]
    assert float(s.class_attention.min()) >= 0
    # the class maps point at the planted classes: argmax over classes matches most grid pixels
    gt_grid = s.gt[2::4, 2::4].long()  # pixel centres of the 32x32 grid
    assert float((s.class_attention.argmax(0) == gt_grid).float().mean()) > 0.7
    # the image gives each object its own colour
    img = s.image.float().flatten(1)  # (3, H*W)
    means = torch.stack([img[:, s.objects.flatten() == i].mean(1) for i in range(n + 1)])  # (n+1, 3)
    dist = torch.cdist(means, means) + 1e3 * torch.eye(n + 1)
    assert float(dist.min()) > 20


def test_attention_outputs_carry_the_layout():
    """A nearest-centroid classifier with the true region means on the finest layer's
    outputs (all heads) recovers the objects: the planted structure is in the heads."""
    s = make_scene(1, grid=32, image_size=64, heads=(4, 2, 2), head_dim=16)
    x = s.layers[-1]  # (heads, 32*32, d)
    feats = x.permute(1, 0, 2).reshape(32 * 32, -1)  # (N, heads*d)
    obj = s.objects[1::2, 1::2].flatten()  # (N,) object index at the 32x32 pixel centres
    ids = torch.unique(obj)
    means = torch.stack([feats[obj == i].mean(0) for i in ids])
    pred = ids[torch.cdist(feats, means).argmin(1)]
    is_obj = obj > 0
    assert float((pred[is_obj] == obj[is_obj]).float().mean()) > 0.8  # 0.58 without signal


def test_stack_and_features():
    scenes = [make_scene(i, **SMALL) for i in range(2)]
    batch = stack_scenes(scenes)
    assert batch["class_attention"].shape == (2, 21, 16, 16)
    assert batch["images"].shape == (2, 3, 64, 64) and batch["gt"].shape == (2, 64, 64)
    assert [tuple(x.shape) for x in batch["layers"]][0] == (2, 4, 16, 8)
    f = scene_features(batch["layers"], 16)
    assert f.shape == (2, 3 * (4 * 3 + 4 * 3 + 2 * 3), 16, 16)
    f0 = scene_features(scenes[0].layers, 16)  # unbatched input
    assert f0.shape == f.shape[1:]
    torch.testing.assert_close(f0, f[0], atol=1e-4, rtol=1e-4)


def test_exception():
    with pytest.raises(ValueError, match="`image_size` has to be a multiple of `grid`"):
        make_scene(0, grid=32, image_size=100)
    with pytest.raises(ValueError, match="`grid` has to be divisible by 4"):
        layer_spec(30)
    with pytest.raises(ValueError, match="`scenes` has to hold at least one scene"):
        stack_scenes([])
    with pytest.raises(ValueError, match="`a` and `b` have to hold as many pixels"):
        mask_miou(torch.zeros(4), torch.zeros(5))


def test_mask_miou_value():
    a = torch.tensor([[0, 0, 1, 1], [0, 0, 255, 255]])
    b = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    # labels 0: IoU 1; 1: 2/4; 255 (own label): 0/2 -> mean 0.5
    assert mask_miou(a, b) == pytest.approx((1 + 0.5 + 0) / 3)
    # against ground truth 255 is no class: mean over 0 and 1
    assert mask_miou(a, b, skip=255) == pytest.approx((1 + 0.5) / 2)
    assert mask_miou(a, a) == 1.0
    assert pixel_agreement(a, b) == pytest.approx(6 / 8)
