"""Dataset Diffusion's labeller (core.dd): against a slow float64 implementation written here from
the rule's description, on planted scenes, the fused labeller's precision, and the checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from pccfast.core.dd import DDConfig, dd_masks, dd_scores, fuse_masks, propagate
from pccfast.core.labeller import label_images
from pccfast.testing.dd_scenes import coverage_precision, dd_inputs
from pccfast.testing.synthetic import make_scene, mask_miou, scene_features, stack_scenes


# --- the independent slow implementation --------------------------------------------------------


def _slow_scores(affinity, class_maps, present, image_hw, cfg):
    """Per image, per class of the prompt, in float64, exactly as described: bicubic quarter ->
    half grid, A^power @ map with the matrix power, min-max to [0, 1], bicubic to the image.

    Returns {(b, k): (H, W) float64 score} over the present classes (background excluded)."""
    out = {}
    b_n, k_n, h4, w4 = class_maps.shape
    f = cfg.class_scale // cfg.affinity_scale
    h2, w2 = h4 * f, w4 * f
    for b in range(b_n):
        a_pow = torch.linalg.matrix_power(affinity[b].double(), cfg.power)  # (N2, N2)
        for k in range(1, k_n):
            if not bool(present[b, k]):
                continue
            m = F.interpolate(class_maps[b, k].double()[None, None], size=(h2, w2), mode="bicubic",
                              align_corners=False)[0, 0]
            v = a_pow @ m.reshape(-1)
            v = (v - v.min()) / (v.max() - v.min()) if float(v.max() - v.min()) > 0 else torch.zeros_like(v)
            out[b, k] = F.interpolate(v.reshape(1, 1, h2, w2), size=image_hw, mode="bicubic",
                                      align_corners=False)[0, 0]
    return out


def _slow_masks(affinity, class_maps, present, image_hw, cfg):
    """(B, H, W) uint8 masks and a (B, H, W) bool 'near a tie' map (within 1e-4 of a threshold or
    of the runner-up class), from ``_slow_scores``, with a Python loop over pixels' classes."""
    scores = _slow_scores(affinity, class_maps, present, image_hw, cfg)
    b_n = class_maps.shape[0]
    masks = torch.zeros(b_n, *image_hw, dtype=torch.uint8)
    near = torch.zeros(b_n, *image_hw, dtype=torch.bool)
    eps = 1e-4
    for b in range(b_n):
        mine = sorted(k for (bb, k) in scores if bb == b)
        if not mine:
            continue
        best = torch.full(image_hw, -math.inf, dtype=torch.float64)
        second = torch.full(image_hw, -math.inf, dtype=torch.float64)
        label = torch.zeros(image_hw, dtype=torch.long)
        for k in mine:
            s = scores[b, k]
            win = s > best
            second = torch.where(win, best, torch.maximum(second, s))
            label = torch.where(win, k, label)
            best = torch.where(win, s, best)
        m = torch.where(best >= cfg.threshold, label, 0)
        m = torch.where((best >= cfg.uncertain_threshold) & (best < cfg.threshold), cfg.ignore_index, m)
        masks[b] = m.to(torch.uint8)
        near[b] = ((best - cfg.threshold).abs() < eps) | ((best - cfg.uncertain_threshold).abs() < eps) | (
            (best - second).abs() < eps)
    return masks, near


def _random_inputs(seed, b=3, k=6, q=4, cfg=DDConfig()):
    g = torch.Generator().manual_seed(seed)
    f = cfg.class_scale // cfg.affinity_scale
    n2 = (q * f) ** 2
    a = torch.rand(b, n2, n2, generator=g) ** 4 + n2 / 8 * torch.eye(n2)  # A^4 not yet mixed to a constant
    a = a / a.sum(-1, keepdim=True)  # (B, N2, N2) row-stochastic
    maps = torch.rand(b, k, q, q, generator=g)  # (B, K, q, q)
    present = torch.rand(b, k, generator=g) < 0.5
    present[0, 1:] = True  # every class
    present[1, 2] = True
    return a, maps, present


def _planted(seeds, grid=64, size=256, cfg=DDConfig()):
    scenes = [make_scene(s, grid=grid, image_size=size, heads=(4, 2, 2), head_dim=16) for s in seeds]
    ins = [dd_inputs(s, cfg, seed=100 + i) for i, s in enumerate(scenes)]
    a = torch.stack([x.affinity for x in ins])  # (B, N2, N2)
    maps = torch.stack([x.class_maps for x in ins])  # (B, K, h4, w4)
    present = torch.stack([x.present for x in ins])  # (B, K)
    return scenes, a, maps, present


# --- the rule against the slow implementation ---------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cfg", [DDConfig(), DDConfig(power=2, threshold=0.7, uncertain_threshold=0.4)])
def test_value_random_inputs_match_slow_float64(seed, cfg):
    a, maps, present = _random_inputs(seed, cfg=cfg)
    got = dd_masks(a, maps, present, (32, 32), cfg)
    want, near = _slow_masks(a, maps, present, (32, 32), cfg)
    assert got.shape == (3, 32, 32) and got.dtype == torch.uint8
    differ = (got != want) & ~near
    assert int(differ.sum()) == 0
    assert float(near.double().mean()) < 0.02  # the ties left aside are few
    assert {0, 255} <= set(got.unique().tolist())  # every outcome of the rule occurs


def test_value_planted_inputs_match_slow_float64():
    _, a, maps, present = _planted([3, 4])
    got = dd_masks(a, maps, present, (256, 256))
    want, near = _slow_masks(a, maps, present, (256, 256), DDConfig())
    assert int(((got != want) & ~near).sum()) == 0
    assert float(near.double().mean()) < 0.01


def test_scores_match_slow_float64():
    cfg = DDConfig()
    a, maps, present = _random_inputs(5)
    got = dd_scores(a, maps, cfg)  # (B, K, 8, 8) every class, no thresholds
    f = cfg.class_scale // cfg.affinity_scale
    for b in range(3):
        p = torch.linalg.matrix_power(a[b].double(), 4)
        for k in range(maps.shape[1]):
            m = F.interpolate(maps[b, k].double()[None, None], size=(8, 8), mode="bicubic", align_corners=False)
            v = p @ m.reshape(-1)
            v = (v - v.min()) / (v.max() - v.min())
            torch.testing.assert_close(got[b, k].double().reshape(-1), v, atol=3e-5, rtol=0)  # float32 vs float64
    assert got.shape == (3, maps.shape[1], 4 * f, 4 * f)


def test_propagate_is_the_matrix_power():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 16, 16, generator=g, dtype=torch.float64)
    x = torch.rand(2, 16, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(propagate(a, x, 4), torch.linalg.matrix_power(a, 4) @ x)
    torch.testing.assert_close(propagate(a, x, 0), x)


def test_batched_equals_one_by_one():
    """Masks of a batch are those of each image alone (no cross-image leakage; ``present``'s
    compaction to the largest class count of the batch changes nothing)."""
    a, maps, present = _random_inputs(7)
    batch = dd_masks(a, maps, present, (24, 24))
    for i in range(3):
        assert torch.equal(batch[i], dd_masks(a[i:i + 1], maps[i:i + 1], present[i:i + 1], (24, 24))[0])


def test_background_and_absent_classes_are_never_labels():
    a, maps, present = _random_inputs(8)
    maps[:, 0] = 100.0  # a huge background map: ignored
    present[:, 0] = True
    present[2] = False  # no class at all: all background
    got = dd_masks(a, maps, present, (16, 16))
    assert torch.equal(got[2], torch.zeros(16, 16, dtype=torch.uint8))
    for b in range(2):
        labels = set(got[b].unique().tolist()) - {0, 255}
        assert labels <= set(present[b].nonzero().flatten().tolist()) - {0}
    single = torch.zeros_like(present)
    single[:, 3] = True  # one class: its own min-max makes its peak 1, so it always appears
    got = dd_masks(a, maps, single, (16, 16))
    assert all(3 in got[b].unique().tolist() for b in range(3))


# --- planted scenes -----------------------------------------------------------------------------

SEEDS = list(range(8))


@pytest.fixture(scope="module")
def planted():
    scenes, a, maps, present = _planted(SEEDS)
    dd = dd_masks(a, maps, present, (256, 256))
    st = stack_scenes(scenes)
    pcc = label_images(scene_features(st["layers"], 64), st["class_attention"], st["images"]).mask
    return scenes, dd, pcc, st["gt"]


def test_planted_scenes_dd_recovers_objects(planted):
    scenes, dd, _, _ = planted
    ious = [mask_miou(dd[i], s.gt, skip=255) for i, s in enumerate(scenes)]
    assert min(ious) >= 0.85, ious
    assert sum(ious) / len(ious) >= 0.88, ious


def test_planted_scenes_fused_precision(planted):
    """The fused mask's precision (right labels / labelled pixels) is at least the better of
    the two labellers'; its coverage is what both agree on."""
    scenes, dd, pcc, gt = planted
    fused = fuse_masks(pcc, dd)
    cov, prec = zip(*(coverage_precision(m, gt) for m in (pcc, dd, fused)))
    print(f"\ncoverage pcc {cov[0]:.3f} dd {cov[1]:.3f} fused {cov[2]:.3f}; "
          f"precision pcc {prec[0]:.4f} dd {prec[1]:.4f} fused {prec[2]:.4f}")
    assert prec[2] >= max(prec[0], prec[1])
    assert cov[2] <= min(cov[0], cov[1])  # nothing is labelled that either leaves uncertain
    assert cov[2] >= 0.6  # and most pixels stay labelled
    agree = (pcc == dd) & (pcc != 255)
    assert torch.equal(fused != 255, agree)


def test_fuse_value_hand_made():
    pcc = torch.tensor([[0, 3, 3, 255], [5, 5, 0, 0]], dtype=torch.uint8)
    dd = torch.tensor([[0, 3, 4, 3], [255, 5, 7, 0]], dtype=torch.uint8)
    want = torch.tensor([[0, 3, 255, 255], [255, 5, 255, 0]], dtype=torch.uint8)
    assert torch.equal(fuse_masks(pcc, dd), want)
    assert torch.equal(fuse_masks(pcc[None], dd[None], ignore_index=9)[0], torch.where(want == 255, 9, want).byte())


# --- configuration and argument checks ----------------------------------------------------------


def test_config_defaults_and_window():
    cfg = DDConfig()
    assert (cfg.affinity_scale, cfg.class_scale, cfg.power, cfg.threshold, cfg.uncertain_threshold) == (2, 4, 4, 0.6, 0.5)
    assert cfg.grids((64, 64)) == ((32, 32), (16, 16))
    assert cfg.grids((16, 16)) == ((8, 8), (4, 4))
    assert cfg.step_window(100) == (0, 100)
    assert DDConfig(step_start=0.5).step_window(81) == (41, 81)
    assert DDConfig(step_end=0.25).step_window(8) == (0, 2)
    with pytest.raises(ValueError, match=r"`step_start` 0.9 and `step_end` 0.95 hold none of the 3 denoising calls"):
        DDConfig(step_start=0.9, step_end=0.95).step_window(3)


@pytest.mark.parametrize("changes,message", [
    (dict(power=0), r"`power` has to be a positive int but is 0"),
    (dict(affinity_scale=3), r"`affinity_scale` has to be a power of 2 \(a UNet level\) but is 3"),
    (dict(class_scale=1), r"`class_scale` has to be at least `affinity_scale` \(2\).* but it is 1"),
    (dict(threshold=0.4), r"`uncertain_threshold` and `threshold` have to satisfy .* but are 0.5 and 0.4"),
    (dict(step_start=0.5, step_end=0.5), r"`step_start` and `step_end` have to satisfy .* but are 0.5 and 0.5"),
    (dict(ignore_index=300), r"`ignore_index` has to lie in \[0, 255\] but is 300"),
])
def test_exception_config(changes, message):
    with pytest.raises(ValueError, match=message):
        DDConfig(**changes)


def test_exception_inputs():
    a, maps, present = _random_inputs(0)
    with pytest.raises(ValueError, match=r"`affinity` has to be \(B, N2, N2\) with N2 = 8\*8 = 64 .* but has shape \(3, 63, 63\)"):
        dd_masks(a[:, :63, :63], maps, present, (8, 8))
    with pytest.raises(ValueError, match=r"`affinity` has to have batch size 3"):
        dd_masks(a[:2], maps, present, (8, 8))
    with pytest.raises(TypeError, match=r"`present` has to be a bool tensor but has dtype torch.int64"):
        dd_masks(a, maps, present.long(), (8, 8))
    with pytest.raises(ValueError, match=r"`present` has to be \(B, K\) = \(3, 6\) like `class_maps` but has shape \(3, 5\)"):
        dd_masks(a, maps, present[:, :5], (8, 8))
    with pytest.raises(ValueError, match=r"`image_hw` has to be a pair of positive ints \(h, w\) but is \(0, 8\)"):
        dd_masks(a, maps, present, (0, 8))
    with pytest.raises(TypeError, match=r"`class_maps` has to be a floating-point tensor"):
        dd_masks(a, maps.long(), present, (8, 8))
    bad = maps.clone()
    bad[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`class_maps` has to be finite but holds 1 NaN or inf values"):
        dd_masks(a, bad, present, (8, 8))
    with pytest.raises(ValueError, match=r"`pcc` and `dd` have to have one shape"):
        fuse_masks(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(3, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"`pcc` has to be an integer tensor"):
        fuse_masks(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.uint8))
