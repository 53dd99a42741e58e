"""relabel reproduces generate on the tiny model, from the captures alone.

Regression for the "dataset integrity" issue: relabel ignored the label set its captures
record (COCO captures failed every file unless --label-set coco was given); its refined masks
differed from generate's (83.7% mean agreement on the tiny model) because generate refined
from the decoded image and relabel from the JPEG; and its output had no images, train.txt or
manifest, so inspect flagged every sample."""
import json
import os

import numpy as np
import pytest
import torch

from pccfast.cli.generate import main as generate_main
from pccfast.cli.relabel import main as relabel_main
from pccfast.data.captures import FORMAT_VERSION, read_capture, write_capture
from pccfast.data.fileio import load_image, load_mask
from pccfast.data.labelsets import get_label_set
from pccfast.data.layout import BLOCKY, IMAGES, MANIFEST, MASKS, SPLIT
from pccfast.tools.inspection import dataset_stats, find_samples

TINY = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--no-progress", "--device", "cpu"]


def _masks(folder: str, sub: str) -> dict:
    d = os.path.join(folder, sub)
    return {n: load_mask(os.path.join(d, n)) for n in sorted(os.listdir(d)) if n.endswith(".png")}


def _same_masks(a: str, b: str, sub: str) -> None:
    ma, mb = _masks(a, sub), _masks(b, sub)
    assert sorted(ma) == sorted(mb) and ma
    for name in ma:
        np.testing.assert_array_equal(ma[name], mb[name], err_msg=f"{sub}/{name}")


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen") / "voc")
    assert generate_main(["--out", out, "--limit", "6", "--batch", "3", "--save-captures", "--save-blocky",
                          *TINY]) == 0
    return out


def test_relabel_from_captures_alone_reproduces_generate(voc_run, tmp_path):
    """No --images: every capture holds its decoded image, and the masks and blocky masks
    are generate's, bit for bit."""
    cap = read_capture(os.path.join(voc_run, "captures", "0.safetensors"))
    assert cap.metadata["format_version"] == FORMAT_VERSION == "3" and cap.image.shape == (3, 64, 64) and cap.image.dtype == torch.uint8
    rel = str(tmp_path / "R")
    assert relabel_main(["--captures", os.path.join(voc_run, "captures"), "--out", rel, "--save-blocky",
                         "--no-progress", "--device", "cpu"]) == 0
    _same_masks(voc_run, rel, MASKS)
    _same_masks(voc_run, rel, BLOCKY)


def test_coco_captures_without_label_set(tmp_path):
    """COCO captures are relabelled with COCO, taken from the captures, and match generate."""
    out = str(tmp_path / "coco")
    assert generate_main(["--out", out, "--label-set", "coco", "--limit", "3", "--batch", "3", "--save-captures",
                          *TINY]) == 0
    rel = str(tmp_path / "R")
    assert relabel_main(["--captures", os.path.join(out, "captures"), "--out", rel, "--no-progress",
                         "--device", "cpu"]) == 0
    assert json.loads(open(os.path.join(rel, "labelset.json")).read())["name"] == "coco"
    _same_masks(out, rel, MASKS)


def test_images_may_be_the_dataset(voc_run, tmp_path, capsys):
    """--images OUT finds OUT/JPEGImages; captures without their image (format 1) use those files."""
    old = str(tmp_path / "old")
    os.makedirs(old)
    for i in range(3):  # the same captures as format_version 1 would hold them: no image
        cap = read_capture(os.path.join(voc_run, "captures", f"{i}.safetensors"))
        m = cap.metadata
        write_capture(os.path.join(old, f"{i}.safetensors"), cap.features, cap.class_attention, label_set=m["label_set"],
                      prompt=m["prompt"], classes=m["classes"], seed=m["seed"], model=m["model"], steps=m["steps"])
    with pytest.raises(SystemExit) as info:
        relabel_main(["--captures", old, "--out", str(tmp_path / "R0"), "--no-progress", "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: `--images` is needed: {os.path.join(old, '0.safetensors')} holds no image (captures "
                   "written before format_version 2 hold none); give --images with the folder of the generated "
                   "images\n")
    assert not os.path.exists(tmp_path / "R0")  # refused before anything was written
    rel = str(tmp_path / "R")
    assert relabel_main(["--captures", old, "--images", voc_run, "--out", rel, "--no-progress", "--device", "cpu"]) == 0
    assert sorted(os.listdir(os.path.join(rel, MASKS))) == ["0.png", "1.png", "2.png"]
    assert "3 masks written, 0 already done, 0 failed" in capsys.readouterr().err


def test_as_dataset_reads_like_a_generated_one(voc_run, tmp_path, capsys):
    """--as-dataset: images, masks, train.txt and a manifest with the captures' metadata;
    inspect finds every sample with its image; a second run resumes."""
    rel = str(tmp_path / "D")
    args = ["--captures", os.path.join(voc_run, "captures"), "--out", rel, "--as-dataset", "--save-blocky",
            "--no-progress", "--device", "cpu"]
    assert relabel_main(args + ["--images", voc_run, "--limit", "4"]) == 0
    assert relabel_main(args) == 0  # no --images: the last two are encoded from the captures' images
    err = capsys.readouterr().err
    assert "2 samples written, 4 already done, 0 failed" in err
    ids = [str(i) for i in range(6)]
    assert open(os.path.join(rel, SPLIT)).read().split() == ids
    records = [json.loads(line) for line in open(os.path.join(rel, MANIFEST))]
    generated = {r["id"]: r for r in map(json.loads, open(os.path.join(voc_run, MANIFEST)))}
    assert [r["id"] for r in records] == ids
    for r in records:
        g = generated[r["id"]]
        assert r == {k: v for k, v in g.items() if k != "seconds"}
    for i in ids[:4]:  # linked or copied from the generated JPEG
        assert open(os.path.join(rel, IMAGES, f"{i}.jpg"), "rb").read() == open(
            os.path.join(voc_run, IMAGES, f"{i}.jpg"), "rb").read()
    for i in ids[4:]:  # encoded from the capture's image: close to the generated JPEG
        a = load_image(os.path.join(rel, IMAGES, f"{i}.jpg")).astype(int)
        b = load_image(os.path.join(voc_run, IMAGES, f"{i}.jpg")).astype(int)
        assert np.abs(a - b).mean() < 3
    _same_masks(voc_run, rel, MASKS)
    samples = find_samples(rel)
    assert [s.id for s in samples] == ids and all(s.image and s.mask and s.blocky for s in samples)
    stats = dataset_stats(samples, get_label_set("voc"))
    assert not [s for s in stats.images if any("image" in r for r in s.reasons)]
    assert [s.reasons for s in stats.images] == [s.reasons for s in dataset_stats(find_samples(voc_run),
                                                                                   get_label_set("voc")).images]


def test_mixed_label_sets_refused(voc_run, tmp_path, capsys):
    """Captures that record different label sets: one line naming two files and their sets."""
    mixed = str(tmp_path / "mixed")
    os.makedirs(mixed)
    src = os.path.join(voc_run, "captures", "0.safetensors")
    os.link(src, os.path.join(mixed, "0.safetensors"))
    cap = read_capture(src)
    coco = get_label_set("coco")
    write_capture(os.path.join(mixed, "1.safetensors"), cap.features, torch.zeros(81, *cap.grid), label_set=coco,
                  prompt="", classes=[], seed=0, model="tiny", steps=2, image=cap.image)
    with pytest.raises(SystemExit) as info:
        relabel_main(["--captures", mixed, "--out", str(tmp_path / "R"), "--no-progress", "--device", "cpu"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: the captures record different label sets: {os.path.join(mixed, '0.safetensors')} has 'voc' "
        f"(21 classes), {os.path.join(mixed, '1.safetensors')} has 'coco' (81 classes); relabel them apart or give "
        "--label-set\n")
    assert not os.path.exists(tmp_path / "R")
    # with --label-set the other set's capture is one failure, as before
    assert relabel_main(["--captures", mixed, "--out", str(tmp_path / "R"), "--label-set", "voc", "--no-progress",
                         "--device", "cpu"]) == 1
    assert "1.safetensors: 'class_attention' has 81 classes but label set 'voc' has 21" in capsys.readouterr().err
