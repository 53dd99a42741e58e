"""The recipe's presets and checks; dataset folders; augmentation drawn by run position."""
import os

import pytest
import torch

from pccfast.training.datasets import TrainSamples, augment, dataset_root, find_pairs
from pccfast.training.recipe import PRESETS, TrainConfig, preset

from conftest import write_planted


def test_presets_hold_the_published_protocols():
    s = PRESETS["syntagen"]
    assert (s.arch, s.max_pairs, s.iters, s.batch, s.crop) == ("deeplabv3_resnet50", 10_000, 100_000, 8, 512)
    d = PRESETS["dd"]
    assert (d.arch, d.optimizer, d.lr, d.weight_decay, d.iters, d.grad_clip, d.backbone_lr_mult, d.eval_every) == (
        "deeplabv3_resnet101", "adamw", 1e-4, 1e-4, 20_000, 0.01, 0.1, 1_000)
    assert (d.betas, d.eps, d.poly_power, d.min_lr, d.crop) == ((0.9, 0.999), 1e-8, 0.9, 0.0, 512)


def test_overrides_and_poly_schedule():
    cfg = preset("syntagen", iters=100, batch=4, crop=64, lr=0.02, eval_every=None)
    assert (cfg.iters, cfg.batch, cfg.crop, cfg.lr, cfg.eval_every) == (100, 4, 64, 0.02, 10_000)
    assert cfg.lr_at(0) == pytest.approx(0.02)
    assert cfg.lr_at(100) == pytest.approx(cfg.min_lr)
    assert cfg.lr_at(50) == pytest.approx((0.02 - 1e-4) * 0.5 ** 0.9 + 1e-4)
    assert TrainConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("changes,message", [
    ({"batch": 1}, "`batch` has to be at least 2 (batch norm needs 2 images per step) but is 1"),
    ({"optimizer": "lamb"}, "`optimizer` has to be sgd or adamw but is 'lamb'"),
    ({"ema_decay": 1.0}, "`ema_decay` has to be between 0 and 1 (exclusive) or None but is 1.0"),
    ({"arch": "unet"}, "`arch` has to be one of"),
])
def test_recipe_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**changes)
    with pytest.raises(ValueError, match="`preset` has to be one of dd, syntagen but is 'x'"):
        preset("x")


def test_voc_and_pccfast_layouts(tmp_path):
    voc = write_planted(str(tmp_path / "r" / "VOCdevkit" / "VOC2012"), range(4), split="val", ext=".jpg")
    assert dataset_root(str(tmp_path / "r")) == voc
    assert [p.id for p in find_pairs(str(tmp_path / "r"), "val")] == ["p00000", "p00001", "p00002", "p00003"]
    # a pccfast dataset as it is while being generated (no split file yet): every mask with an image
    ds = write_planted(str(tmp_path / "ds"), range(3), split=None, ext=".png")
    os.remove(os.path.join(ds, "JPEGImages", "p00002.png"))
    assert [p.id for p in find_pairs(ds, "val")] == ["p00000", "p00001"]


def test_wrong_folders_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"`--val` '.*empty' is not a dataset folder: it has no JPEGImages/ and "
                                         r"SegmentationClass/"):
        find_pairs(str(tmp_path / "empty"), "val", "--val")
    with pytest.raises(ValueError, match="is not a folder"):
        find_pairs(str(tmp_path / "nope"), "train")
    ds = write_planted(str(tmp_path / "ds"), range(2), split="train")
    os.remove(os.path.join(ds, "SegmentationClass", "p00001.png"))
    with pytest.raises(ValueError, match=r"train.txt: 1 of its 2 ids have no image .* \(first: p00001\)"):
        find_pairs(ds, "train")


def test_augment_shapes_padding_and_flip():
    image = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30)
    mask = torch.arange(20 * 30).reshape(20, 30) % 7
    g = torch.Generator().manual_seed(0)
    im, m = augment(image, mask, 40, (0.5, 0.5), False, g)  # short side -> 20: 20 x 30, padded to 40 x 40
    assert im.shape == (3, 40, 40) and m.shape == (40, 40)
    assert (m == 255).sum() == 40 * 40 - 20 * 30 and (im[:, m == 255] == 0).all()
    im1, m1 = augment(image, mask, 20, (1.0, 1.0), False, torch.Generator().manual_seed(3))
    im2, m2 = augment(image, mask, 20, (1.0, 1.0), True, torch.Generator().manual_seed(3))
    flipped = torch.rand(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)[3] < 0.5
    assert torch.equal(m2, m1.flip(-1) if flipped else m1)


def test_samples_are_a_function_of_seed_and_position(tmp_path):
    ds = write_planted(str(tmp_path / "ds"), range(6))
    pairs = find_pairs(ds, "train")
    a = TrainSamples(pairs, 21, crop=32, scale=(0.5, 2.0), flip=True, seed=5)
    b = TrainSamples(pairs, 21, crop=32, scale=(0.5, 2.0), flip=True, seed=5)
    for pos in (0, 7, 3, 13):  # any order, any instance (worker)
        assert all(torch.equal(x, y) for x, y in zip(a[pos], b[pos]))
    first_pass = sorted(int(i) for i in a.order(0))
    assert first_pass == list(range(6)) and not torch.equal(a.order(0), a.order(1))
    c = TrainSamples(pairs, 21, crop=32, scale=(0.5, 2.0), flip=True, seed=6)
    assert not torch.equal(a[0][0], c[0][0])


def test_cli_lr_below_the_presets_floor_ends_at_zero():
    """Regression: --lr under the syntagen floor (1e-4) was refused by the recipe's check."""
    from pccfast.cli.train import _recipe, build_parser

    cfg = _recipe(build_parser().parse_args(["d", "--out", "o", "--lr", "5e-5"]))
    assert (cfg.lr, cfg.min_lr) == (5e-5, 0.0)
    cfg = _recipe(build_parser().parse_args(["d", "--out", "o", "--lr", "0.05", "--scale-range", "1,2"]))
    assert (cfg.lr, cfg.min_lr, cfg.scale_min, cfg.scale_max) == (0.05, 1e-4, 1.0, 2.0)
