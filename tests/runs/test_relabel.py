import json
import os
import sys
import threading
import types

import numpy as np
import pytest
import torch
from pccfast.testing.fixtures import make_dataset, make_scene
from PIL import Image

from pccfast.cli.relabel import main
from pccfast.data.captures import read_capture, write_capture
from pccfast.core.config import PCCConfig
from pccfast.data.fileio import load_image, load_mask, save_image
from pccfast.core.labelset import VOC_CLASSES as VOC, voc_palette
from pccfast.data.masks import find_inputs
from pccfast.runs.engine import prefetched as _prefetched
from pccfast.runs.relabel import relabel_dir


# ------------------------------------------------------------------------------------------
# a stand-in labeller (the contract of pccfast.labeller.label_images) with a known answer
# ------------------------------------------------------------------------------------------
class FakeLabeller:
    """blocky = argmax of the class maps; mask = blocky upsampled, with the top-left image
    pixel set to 255 (so the uncertain value is exercised). Records every call's batch size."""

    def __init__(self, fail_batches=False, fail_marker=None, interrupt_at=None):
        self.calls = []
        self.fail_batches = fail_batches  # RuntimeError (as out of memory) for any batch > 1
        self.fail_marker = fail_marker  # ValueError for a capture whose features[0, 0, 0] equals this
        self.interrupt_at = interrupt_at  # KeyboardInterrupt (Ctrl-C) in this call (0-based)

    def label_images(self, features, class_attention, images, cfg=None, *, return_blocky=True, cache=None):
        assert features.ndim == 4 and class_attention.ndim == 4 and images.shape[1] == 3
        assert images.dtype == torch.uint8 and isinstance(cfg, PCCConfig)
        assert features.dtype == class_attention.dtype == torch.float32
        assert features.is_contiguous() and class_attention.is_contiguous() and images.is_contiguous()
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if self.fail_batches and features.shape[0] > 1:
            raise RuntimeError("CUDA out of memory (pretend)\nsecond line")
        if self.fail_marker is not None and bool((features[:, 0, 0, 0] == self.fail_marker).any()):
            raise ValueError("`features` pretend problem")
        self.calls.append(features.shape[0])
        blocky = class_attention.argmax(1).to(torch.uint8)  # (B, h, w)
        sy, sx = images.shape[2] // blocky.shape[1], images.shape[3] // blocky.shape[2]
        full = blocky.repeat_interleave(sy, 1).repeat_interleave(sx, 2)  # (B, H, W)
        mask = full.clone()
        mask[:, 0, 0] = cfg.ignore_index
        return types.SimpleNamespace(mask=mask, blocky=blocky if return_blocky else None,
                                     blocky_full=full if return_blocky else None)


@pytest.fixture
def fake(monkeypatch):
    lab = FakeLabeller()
    module = types.ModuleType("pccfast.core.labeller")
    module.label_images = lab.label_images
    monkeypatch.setitem(sys.modules, "pccfast.core.labeller", module)
    return lab


def expected_mask(scene):
    top, left, bottom, right = (v * scene.scale for v in scene.box)
    size = 16 * scene.scale
    m = np.zeros((size, size), np.uint8)
    m[top:bottom, left:right] = scene.cls
    return m


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


VOC_FLAT = [v for rgb in voc_palette(256)[:255] for v in rgb] + [224, 224, 192]


# ------------------------------------------------------------------------------------------
# relabel
# ------------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, fake, capsys):
    captures, images, scenes = make_dataset(str(tmp_path), n=3)
    out = str(tmp_path / "out")
    code = main(["--captures", captures, "--images", images, "--out", out, "--batch", "2", "--save-blocky",
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    assert fake.calls == [2, 1]  # three same-size captures in batches of 2
    assert all_files(out) == ["SegmentationClass/0.png", "SegmentationClass/1.png", "SegmentationClass/2.png",
                              "SegmentationClassBlocky/0.png", "SegmentationClassBlocky/1.png",
                              "SegmentationClassBlocky/2.png", "labelset.json"]
    for s in scenes:
        with Image.open(os.path.join(out, "SegmentationClass", f"{s.id}.png")) as im:
            assert im.mode == "P" and im.size == (64, 64)
            assert im.getpalette()[: 256 * 3] == VOC_FLAT
        mask = load_mask(os.path.join(out, "SegmentationClass", f"{s.id}.png"))
        want = expected_mask(s)
        want[0, 0] = 255
        np.testing.assert_array_equal(mask, want)
        assert set(np.unique(mask)) <= set(range(21)) | {255}
        np.testing.assert_array_equal(load_mask(os.path.join(out, "SegmentationClassBlocky", f"{s.id}.png")),
                                      expected_mask(s))
    err = capsys.readouterr().err
    assert "3 masks written, 0 already done, 0 failed" in err


def test_bad_inputs_reported_and_skipped(tmp_path, fake, capsys):
    """One broken capture, one missing image, one image of the wrong size, one unreadable image:
    the good captures are written, every failure is one line naming its file, exit status 1,
    no temporary or partial files."""
    captures, images, scenes = make_dataset(str(tmp_path), n=2)
    make_scene(captures, images, "broken", seed=5)
    path = os.path.join(captures, "broken.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    make_scene(captures, images, "noimage", seed=6)
    os.remove(os.path.join(images, "noimage.png"))
    make_scene(captures, images, "size", seed=7)
    save_image(os.path.join(images, "size.png"), np.zeros((64, 72, 3), np.uint8))
    make_scene(captures, images, "unreadable", seed=8, image_ext=".jpg")
    open(os.path.join(images, "unreadable.jpg"), "wb").write(b"not a jpeg at all")

    out = str(tmp_path / "out")
    code = main(["--captures", captures, "--images", images, "--out", out, "--device", "cpu", "--no-progress"])
    assert code == 1
    assert all_files(out) == ["SegmentationClass/0.png", "SegmentationClass/1.png", "labelset.json"]
    err = capsys.readouterr().err.splitlines()
    live = [line for line in err if line.startswith("error: ")]
    listed = [line.strip() for line in err[err.index("4 failed:") + 1 :]]
    assert [line[len("error: "):] for line in live] == listed  # printed as it happened, listed at the end
    assert listed[0].startswith(path + ": not a safetensors file or truncated") or listed[0].startswith(
        path + ": corrupt safetensors file")
    assert listed[1] == (f"{os.path.join(captures, 'noimage.safetensors')}: no image for it in {images} "
                         "(expected one of noimage.jpg, noimage.jpeg, noimage.png)")
    assert listed[2] == (f"{os.path.join(images, 'size.png')}: image is 72x64 (width x height) but has to be a "
                         f"multiple of the capture grid 16x16 of {os.path.join(captures, 'size.safetensors')}")
    assert listed[3].startswith(f"{os.path.join(images, 'unreadable.jpg')}: cannot read the image: ")
    assert any("2 masks written, 0 already done, 4 failed" in line for line in err)


def test_resume_and_overwrite(tmp_path, fake):
    captures, images, scenes = make_dataset(str(tmp_path), n=3)
    out = str(tmp_path / "out")
    args = ["--captures", captures, "--images", images, "--out", out, "--device", "cpu", "--no-progress"]
    assert main(args + ["--limit", "2"]) == 0
    assert fake.calls == [2] and len(os.listdir(os.path.join(out, "SegmentationClass"))) == 2
    assert main(args) == 0
    assert fake.calls == [2, 1]  # only the third id was left
    before = os.stat(os.path.join(out, "SegmentationClass", "0.png")).st_mtime_ns
    assert main(args) == 0 and fake.calls == [2, 1]  # everything done: nothing labelled
    assert os.stat(os.path.join(out, "SegmentationClass", "0.png")).st_mtime_ns == before
    assert main(args + ["--save-blocky"]) == 0 and fake.calls == [2, 1, 3]  # blocky masks missing: redone
    os.remove(os.path.join(out, "SegmentationClass", "1.png"))
    report = relabel_dir(captures, images, out, device="cpu")
    assert report.written == ["1"] and report.skipped == ["0", "2"] and report.ok
    assert main(args + ["--overwrite"]) == 0 and fake.calls[-1] == 3


def test_api_buckets_sizes_and_retries(tmp_path, fake):
    """Captures of different sizes go to different batches; a batch the labeller refuses is
    retried one capture at a time, and only a capture that fails alone is reported."""
    captures, images, _ = make_dataset(str(tmp_path), n=2)
    make_scene(captures, images, "big", grid=16, scale=8, seed=3, image_ext=".jpg")
    make_scene(captures, images, "small", grid=8, scale=4, dim=12, seed=4)
    out = str(tmp_path / "out")
    report = relabel_dir(captures, images, out, batch=4, device="cpu", workers=0)
    assert report.ok and sorted(report.written) == ["0", "1", "big", "small"]
    assert sorted(fake.calls) == [1, 1, 2]
    assert load_mask(os.path.join(out, "SegmentationClass", "big.png")).shape == (128, 128)
    assert load_mask(os.path.join(out, "SegmentationClass", "small.png")).shape == (32, 32)

    fake.calls.clear()
    fake.fail_batches = True
    fake.fail_marker = float(read_capture(os.path.join(captures, "1.safetensors")).features[0, 0, 0])
    report = relabel_dir(captures, images, str(tmp_path / "out2"), batch=4, device="cpu", workers=1)
    assert sorted(report.written) == ["0", "big", "small"]
    assert report.failures == [("1", f"{os.path.join(captures, '1.safetensors')}: labelling failed: "
                                      "`features` pretend problem")]


def test_label_set_checked(tmp_path, fake, capsys):
    """Without --label-set the captures' own set is used; with one, a capture of another set
    is a per-file failure, and an --out made with another set is refused."""
    ls = {"name": "fruit", "classes": ["background", "apple", "pear"]}
    make_scene(str(tmp_path / "c"), str(tmp_path / "i"), "a", cls=2, label_set=ls)
    args = ["--captures", str(tmp_path / "c"), "--images", str(tmp_path / "i"), "--out", str(tmp_path / "o"),
            "--no-progress", "--device", "cpu"]
    assert main(args + ["--label-set", "voc"]) == 1
    assert "a.safetensors: 'class_attention' has 3 classes but label set 'voc' has 21" in capsys.readouterr().err
    (tmp_path / "fruit.json").write_text(json.dumps(ls))
    # the folder now holds a VOC labelset.json: another label set is refused, not written over it
    for extra in (["--label-set", str(tmp_path / "fruit.json")], []):
        with pytest.raises(SystemExit) as info:
            main(args + extra)
        assert info.value.code == 2
        assert capsys.readouterr().err == (f"error: {tmp_path / 'o' / 'labelset.json'}: the dataset was made with "
                                           "label set 'voc' (21 classes), not 'fruit'; use another --out\n")
    assert json.loads((tmp_path / "o" / "labelset.json").read_text())["name"] == "voc"
    args[args.index("--out") + 1] = str(tmp_path / "o2")
    assert main(args + ["--label-set", str(tmp_path / "fruit.json")]) == 0
    assert set(np.unique(load_mask(str(tmp_path / "o2" / "SegmentationClass" / "a.png")))) == {0, 2, 255}
    args[args.index("--out") + 1] = str(tmp_path / "o3")
    assert main(args) == 0  # the set the captures record
    assert json.loads((tmp_path / "o3" / "labelset.json").read_text())["classes"] == ls["classes"]
    assert set(np.unique(load_mask(str(tmp_path / "o3" / "SegmentationClass" / "a.png")))) == {0, 2, 255}


def test_cli_usage_errors(tmp_path, fake, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "captures").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["--captures", str(tmp_path / "empty"), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: `--captures` ")
    assert "holds no .safetensors files (did you mean" in err
    with pytest.raises(SystemExit) as info:
        main(["--captures", str(tmp_path / "nope"), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: `--captures` has to be a directory but {str(tmp_path / 'nope')!r} is not one\n"
    with pytest.raises(SystemExit) as info:
        main(["--captures", str(tmp_path), "--images", str(tmp_path), "--out", "o", "--batch", "0"])
    assert info.value.code == 2 and "--batch: has to be a positive integer but is '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--captures", str(tmp_path), "--images", str(tmp_path), "--out", "o", "--connectivity", "5"])
    assert capsys.readouterr().err == "error: `connectivity` has to be 4 or 8 but is 5\n"


def test_find_inputs_prefers_jpg(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "i").mkdir()
    for name in ("b.safetensors", "a.safetensors", ".tmp-x-a.safetensors", "notes.txt"):
        (tmp_path / "c" / name).write_bytes(b"")
    for name in ("a.png", "a.JPG", "b.png", "c.jpg"):
        (tmp_path / "i" / name).write_bytes(b"")
    got = [(p.id, p.capture, p.image) for p in find_inputs(str(tmp_path / "c"), str(tmp_path / "i"))]
    assert got == [("a", str(tmp_path / "c" / "a.safetensors"), str(tmp_path / "i" / "a.JPG")),
                   ("b", str(tmp_path / "c" / "b.safetensors"), str(tmp_path / "i" / "b.png"))]


def test_real_labeller_end_to_end(tmp_path):
    """With the real pccfast.labeller: palette PNGs, values in the label set or 255, and the
    rectangle of each scene mostly labelled with its class."""
    captures, images, scenes = make_dataset(str(tmp_path), n=2)
    out = str(tmp_path / "out")
    report = relabel_dir(captures, images, out, device="cpu", save_blocky=True, batch=2)
    assert report.ok and report.written == ["0", "1"]
    for s in scenes:
        mask = load_mask(os.path.join(out, "SegmentationClass", f"{s.id}.png"))
        assert mask.shape == (64, 64)
        assert set(np.unique(mask)) <= set(range(21)) | {255}
        inside = expected_mask(s) == s.cls
        labels, counts = np.unique(mask[inside], return_counts=True)
        assert labels[np.argmax(counts)] == s.cls
        blocky = load_mask(os.path.join(out, "SegmentationClassBlocky", f"{s.id}.png"))
        assert (blocky[inside] == s.cls).mean() > 0.9


def _relabel_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("pccfast-")]


def test_prefetched_order_errors_and_close():
    """The background producer keeps the order, raises its error once at its place, and
    stops when the consumer stops early."""
    assert list(_prefetched(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield from range(5)
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="^disk gone$"):
        for x in _prefetched(broken(), depth=3):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    gen = _prefetched(endless(), depth=2)
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()
    assert not _relabel_threads()
    assert len(produced) <= 3 + 2 + 1  # taken, queued, one waiting to be queued


def test_threads_match_in_line(tmp_path, fake, capsys):
    """Reading ahead and writing behind in threads gives what the in-line run gives: the same
    files byte for byte, the same report, a bad capture reported once with its name."""
    captures, images, _ = make_dataset(str(tmp_path), n=5)
    make_scene(captures, images, "2b", seed=9)  # sorts between 2 and 3
    bad = os.path.join(captures, "2b.safetensors")
    with open(bad, "r+b") as f:
        f.truncate(100)
    runs = {}
    for workers in (0, 3):
        out = str(tmp_path / f"out{workers}")
        capsys.readouterr()
        report = relabel_dir(captures, images, out, batch=2, device="cpu", save_blocky=True, workers=workers)
        logged = [x[len("error: "):] for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        files = {f: open(os.path.join(out, f), "rb").read() for f in all_files(out)}
        runs[workers] = (report.written, report.failures, logged, files)
        assert not _relabel_threads()
    assert runs[0] == runs[3]
    written, failures, logged, files = runs[3]
    assert written == ["0", "1", "2", "3", "4"]
    assert [f[0] for f in failures] == ["2b"] and failures[0][1].startswith(bad + ": ")
    assert logged == [failures[0][1]]
    assert len(files) == 11  # 5 masks, 5 blocky masks, labelset.json
    assert fake.calls == [2, 1, 2] * 2  # batches [0, 1], [2, (2b unreadable)], [3, 4]


@pytest.mark.parametrize("workers", [0, 2])
def test_partial_batches_in_first_seen_order(tmp_path, fake, workers):
    """Batches that never fill are labelled at the end in the order their first capture came,
    also when the inputs left could not fill a batch (regression: a bucket sized to the inputs
    left was taken for full)."""
    captures, images = str(tmp_path / "c"), str(tmp_path / "i")
    make_scene(captures, images, "a0", grid=16, scale=4, seed=1)
    make_scene(captures, images, "b0", grid=8, scale=4, seed=2)
    make_scene(captures, images, "b1", grid=8, scale=4, seed=3)
    report = relabel_dir(captures, images, str(tmp_path / "out"), batch=4, device="cpu", workers=workers)
    assert report.written == ["a0", "b0", "b1"] and fake.calls == [1, 2]


def test_interrupt_stops_cleanly(tmp_path, fake):
    """Ctrl-C while the labeller runs: the exception reaches the caller, the threads end,
    batches labelled before are written whole, nothing half-written is left, and a second
    run does the rest."""
    captures, images, _ = make_dataset(str(tmp_path), n=4)
    out = str(tmp_path / "out")
    fake.interrupt_at = 1
    with pytest.raises(KeyboardInterrupt):
        relabel_dir(captures, images, out, batch=1, device="cpu", workers=2)
    assert not _relabel_threads()
    assert all_files(out) == ["SegmentationClass/0.png", "labelset.json"]
    assert load_mask(os.path.join(out, "SegmentationClass", "0.png")).shape == (64, 64)
    fake.interrupt_at = None
    report = relabel_dir(captures, images, out, batch=1, device="cpu", workers=2)
    assert report.written == ["1", "2", "3"] and report.skipped == ["0"]


def test_labeller_crash_propagates(tmp_path, fake, monkeypatch):
    """An unexpected error in a reader thread (not a bad input) is raised to the caller."""
    captures, images, _ = make_dataset(str(tmp_path), n=3)

    def boom(*args, **kw):
        raise MemoryError("pretend")

    monkeypatch.setattr("pccfast.data.masks.read_capture", boom)
    for workers in (0, 2):
        with pytest.raises(MemoryError, match="pretend"):
            relabel_dir(captures, images, str(tmp_path / "out"), device="cpu", workers=workers)
        assert not _relabel_threads()


# ------------------------------------------------------------------------------------------
# sharding through the run engine (the real labeller)
# ------------------------------------------------------------------------------------------
def test_shards_write_every_mask_exactly_once(tmp_path, capsys):
    """relabel --shard 0/2 and --shard 1/2 into one folder: every mask once, byte-equal to the
    unsharded run; each shard's summary counts only its own captures."""
    captures, images, _ = make_dataset(str(tmp_path), n=7)
    base = ["--captures", captures, "--images", images, "--device", "cpu", "--no-progress", "--batch", "2"]
    assert main(base + ["--out", str(tmp_path / "all")]) == 0
    shared = str(tmp_path / "shared")
    assert main(base + ["--out", shared, "--shard", "0/2"]) == 0
    assert "4 masks written" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(shared, "SegmentationClass"))) == ["0.png", "2.png", "4.png", "6.png"]
    assert main(base + ["--out", shared, "--shard", "1/2", "--batch", "3"]) == 0  # the split ignores the batch
    assert "3 masks written, 0 already done" in capsys.readouterr().err
    assert all_files(shared) == all_files(str(tmp_path / "all"))
    for f in all_files(shared):
        assert open(os.path.join(shared, f), "rb").read() == open(os.path.join(tmp_path, "all", f), "rb").read(), f
    assert main(base + ["--out", shared, "--shard", "1/2"]) == 0  # resume: nothing left
    assert "0 masks written, 3 already done" in capsys.readouterr().err


def test_workers_without_ray_keeps_its_old_meaning(tmp_path, fake, capsys):
    """Before the run engine, --workers N set relabel's reader threads: without --ray it still
    does (with a warning), so existing commands run as they did."""
    captures, images, _ = make_dataset(str(tmp_path), n=3)
    base = ["--captures", captures, "--images", images, "--device", "cpu", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a"), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: --workers without --ray sets the reader threads, which are --io-threads now" in err
    assert "3 masks written" in err
    assert main(base + ["--out", str(tmp_path / "b"), "--io-threads", "0"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert all_files(str(tmp_path / "a")) == all_files(str(tmp_path / "b"))


# ------------------------------------------------------------------------------------------
# the captures' own label set and image; --images as a dataset folder; --as-dataset
# ------------------------------------------------------------------------------------------
def _with_image(captures, sid, image_hw3):
    """Rewrite capture ``sid`` with its image (format_version 2)."""
    path = os.path.join(captures, f"{sid}.safetensors")
    cap = read_capture(path)
    m = cap.metadata
    write_capture(path, cap.features, cap.class_attention, label_set=m["label_set"], prompt=m["prompt"],
                  classes=m["classes"], seed=m["seed"], model=m["model"], steps=m["steps"],
                  image=torch.from_numpy(np.ascontiguousarray(image_hw3.transpose(2, 0, 1))))


def test_capture_image_is_labelled_not_the_file(tmp_path, fake, monkeypatch):
    """A capture holding its image is labelled from it (the file is not even read); one
    without takes the image file."""
    captures, images, _ = make_dataset(str(tmp_path), n=2)
    own = np.full((64, 64, 3), 7, np.uint8)
    _with_image(captures, "0", own)
    seen = []
    label = fake.label_images

    def spy(features, class_attention, images, cfg=None, **kw):
        seen.extend(images.permute(0, 2, 3, 1).numpy().copy())
        return label(features, class_attention, images, cfg, **kw)

    fake.label_images = spy
    module = sys.modules["pccfast.core.labeller"]
    monkeypatch.setattr(module, "label_images", spy)
    report = relabel_dir(captures, images, str(tmp_path / "out"), device="cpu", workers=0)
    assert report.ok and report.written == ["0", "1"]
    np.testing.assert_array_equal(seen[0], own)
    np.testing.assert_array_equal(seen[1], load_image(os.path.join(images, "1.png")))


def test_images_dataset_folder_and_optional(tmp_path, fake, capsys):
    """--images DATASET finds DATASET/JPEGImages; without --images every capture needs its image."""
    captures, images, _ = make_dataset(str(tmp_path), n=2)
    dataset = tmp_path / "ds"
    os.makedirs(dataset)
    os.rename(images, dataset / "JPEGImages")
    base = ["--captures", captures, "--device", "cpu", "--no-progress"]
    assert main(base + ["--images", str(dataset), "--out", str(tmp_path / "a")]) == 0
    assert sorted(os.listdir(tmp_path / "a" / "SegmentationClass")) == ["0.png", "1.png"]
    _with_image(captures, "0", np.zeros((64, 64, 3), np.uint8))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(base + ["--out", str(tmp_path / "b")])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: `--images` is needed: {os.path.join(captures, '1.safetensors')} holds no image (captures written "
        "before format_version 2 hold none); give --images with the folder of the generated images\n")
    assert main(base + ["--out", str(tmp_path / "c"), "--limit", "1"]) == 0  # only the capture with its image


def test_mixed_label_sets_one_line(tmp_path, fake):
    """Captures recording different label sets are refused before anything is written, naming
    two files and their sets; a broken capture does not count (it fails on its own)."""
    captures, images, _ = make_dataset(str(tmp_path), n=1)
    make_scene(captures, images, "f", cls=1, label_set={"name": "fruit", "classes": ["background", "apple"]})
    open(os.path.join(captures, "00.safetensors"), "wb").write(b"broken")
    with pytest.raises(ValueError) as info:
        relabel_dir(captures, images, str(tmp_path / "out"), device="cpu")
    assert str(info.value) == (
        f"the captures record different label sets: {os.path.join(captures, '0.safetensors')} has 'voc' (21 classes), "
        f"{os.path.join(captures, 'f.safetensors')} has 'fruit' (2 classes); relabel them apart or give --label-set")
    assert not os.path.exists(tmp_path / "out")
    report = relabel_dir(captures, images, str(tmp_path / "out"), device="cpu", label_set="voc")
    assert report.written == ["0"] and [f[0] for f in report.failures] == ["00", "f"]


def test_label_set_file_next_to_captures_gives_palette(tmp_path, fake):
    """A custom set recorded by the captures takes its palette from OUT/labelset.json (generate's layout)."""
    ls = {"name": "fruit", "classes": ["background", "apple", "pear"], "palette": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]}
    root = tmp_path / "gen"
    make_scene(str(root / "captures"), str(root / "JPEGImages"), "a", cls=2, label_set=ls)
    (root / "labelset.json").write_text(json.dumps(ls))
    report = relabel_dir(str(root / "captures"), str(root), str(tmp_path / "out"), device="cpu")
    assert report.ok
    with Image.open(tmp_path / "out" / "SegmentationClass" / "a.png") as im:
        assert im.getpalette()[:9] == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_as_dataset_files_and_resume(tmp_path, fake):
    """--as-dataset: a JPEG source is linked or copied, a PNG source encoded as JPEG; manifest
    records carry the captures' metadata; train.txt lists every id; a re-run does nothing."""
    captures, images, scenes = make_dataset(str(tmp_path), n=2)
    make_scene(captures, images, "j", seed=9, image_ext=".jpg")
    out = str(tmp_path / "D")
    args = ["--captures", captures, "--images", images, "--out", out, "--as-dataset", "--device", "cpu",
            "--no-progress"]
    assert main(args) == 0
    assert all_files(out) == ["ImageSets/Segmentation/train.txt", "JPEGImages/0.jpg", "JPEGImages/1.jpg",
                              "JPEGImages/j.jpg", "SegmentationClass/0.png", "SegmentationClass/1.png",
                              "SegmentationClass/j.png", "labelset.json", "manifest.jsonl"]
    assert open(os.path.join(out, "JPEGImages", "j.jpg"), "rb").read() == open(os.path.join(images, "j.jpg"),
                                                                               "rb").read()
    with Image.open(os.path.join(out, "JPEGImages", "0.jpg")) as im:
        assert im.format == "JPEG" and im.size == (64, 64)
    records = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    assert records[0] == {"id": "0", "index": 0, "prompt": f"a photo of a {VOC[scenes[0].cls]}",
                          "classes": [VOC[scenes[0].cls]], "seed": 0, "model": "tiny", "steps": 2,
                          "height": 64, "width": 64}
    assert open(os.path.join(out, "ImageSets", "Segmentation", "train.txt")).read() == "0\n1\nj\n"
    n = len(fake.calls)
    assert main(args) == 0 and len(fake.calls) == n  # resumed: all done
    os.remove(os.path.join(out, "JPEGImages", "1.jpg"))  # a sample without its image is not done
    assert relabel_dir(captures, images, out, device="cpu", as_dataset=True).written == ["1"]


def test_unwritable_out_is_one_line_before_any_work(tmp_path, fake, capsys, monkeypatch):
    """Regression: a read-only dataset resumed failed only after the work, one mask at a time."""
    import errno as _errno

    from pccfast.data import fileio

    captures, images, _ = make_dataset(str(tmp_path), n=2)

    def denied(*a, **k):
        raise PermissionError(_errno.EACCES, "Permission denied")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", denied)
    with pytest.raises(SystemExit) as info:
        main(["--captures", captures, "--images", images, "--out", str(tmp_path / "o"), "--device", "cpu",
              "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err == [f"error: {tmp_path / 'o'}: cannot write files here: Permission denied"]
    assert fake.calls == []  # nothing labelled
