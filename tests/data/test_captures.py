import json
import os
import re

import pytest
import torch
from pccfast.testing.fixtures import good_metadata, make_scene, write_raw_capture
from safetensors import safe_open

from pccfast.data.captures import FORMAT_VERSION, CaptureError, read_capture, read_capture_info, write_capture
from pccfast.core.labelset import VOC_CLASSES
from pccfast.data.labelsets import get_label_set


def _pair(d=6, k=21, h=4, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, h, w, generator=g), torch.rand(k, h, w, generator=g)


def test_round_trip(tmp_path, device):
    features, class_attention = _pair()
    path = str(tmp_path / "sub" / "7.safetensors")
    write_capture(
        path, features.to(device), class_attention.to(device), label_set="voc",
        prompt="a cat on a sofa", classes=["cat", "sofa", "cat"], seed=2031, model="sd21", steps=80,
    )
    cap = read_capture(path, label_set="voc")
    assert cap.path == path
    assert cap.features.dtype == torch.float32 and cap.features.device.type == "cpu"
    torch.testing.assert_close(cap.features, features, rtol=0, atol=0)
    torch.testing.assert_close(cap.class_attention, class_attention, rtol=0, atol=0)
    assert cap.grid == (4, 5)
    assert cap.metadata == {
        "format_version": "3", "label_set": "voc", "label_classes": list(VOC_CLASSES),
        "prompt": "a cat on a sofa", "classes": ["cat", "sofa", "cat"], "seed": 2031, "model": "sd21", "steps": 80,
        "grid": (4, 5), "halves": None,
    }
    assert cap.image is None  # written without one
    assert os.listdir(tmp_path / "sub") == ["7.safetensors"]  # no temp file left


def test_format_on_disk(tmp_path):
    """The file is plain safetensors with string metadata exactly as HELPERS.md states."""
    features, class_attention = _pair(k=21)
    path = str(tmp_path / "a.safetensors")
    write_capture(path, features.double(), class_attention.half(), label_set=get_label_set("voc"),
                  prompt="p", classes=[], seed=None, model="m", steps=None)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["class_attention", "features"]
        assert f.get_tensor("features").dtype == torch.float32
        assert f.get_tensor("class_attention").dtype == torch.float32
    assert meta["format_version"] == FORMAT_VERSION == "3"
    assert meta["grid"] == "4,5" and meta["halves"] == ""  # (h, w) of a non-square grid; halves unknown
    assert json.loads(meta["label_classes"]) == list(VOC_CLASSES)
    assert meta["classes"] == "[]" and meta["seed"] == "" and meta["steps"] == ""
    cap = read_capture(path)
    assert cap.metadata["seed"] is None and cap.metadata["steps"] is None


def test_other_label_set(tmp_path):
    ls = get_label_set({"name": "fruit", "classes": ["background", "apple", "pear"]})
    features, class_attention = _pair(k=3)
    path = str(tmp_path / "f.safetensors")
    write_capture(path, features, class_attention, label_set=ls, prompt="", classes=["pear"], seed=1, model="m", steps=1)
    assert read_capture(path, ls).metadata["label_set"] == "fruit"
    with pytest.raises(CaptureError, match=r"'class_attention' has 3 classes but label set 'voc' has 21$"):
        read_capture(path, "voc")


def test_scene_fixture(tmp_path):
    scene = make_scene(str(tmp_path / "c"), str(tmp_path / "i"), "x", grid=8, scale=2, dim=5, cls=3)
    cap = read_capture(scene.capture, "voc")
    assert cap.features.shape == (5, 8, 8) and cap.class_attention.shape == (21, 8, 8)
    assert cap.class_attention[3].sum() > 0 and cap.class_attention[4].sum() == 0


def _bad(tmp_path, name="7.safetensors", features=None, class_attention=None, drop=(), image=None, **meta):
    f, c = _pair()
    tensors = {"features": f if features is None else features,
               "class_attention": c if class_attention is None else class_attention}
    if image is not None:
        tensors["image"] = image
    for k in drop:
        tensors.pop(k)
    return write_raw_capture(str(tmp_path / name), tensors, good_metadata(**meta))


def _bad_cases():
    """(keyword arguments of ``_bad``, label set to read with, expected message after the path)."""
    f, c = _pair()
    nan = f.clone()
    nan[0, 0, 0] = float("nan")
    inf = c.clone()
    inf[1, 1, 1] = float("inf")
    labels = list(VOC_CLASSES)
    labels[3] = "birb"
    return [
        (dict(drop=["class_attention"]), "voc", r"tensor 'class_attention' missing \(a capture holds"),
        (dict(features=f[0]), None, r"'features' has to be \(D, h, w\) \(3 dims\) but has shape \(4, 5\)$"),
        (dict(class_attention=c.to(torch.int32)), None,
         r"'class_attention' has to be a floating-point tensor but has dtype torch.int32$"),
        (dict(features=nan), None, r"'features' has to be finite but holds 1 NaN and 0 inf values$"),
        (dict(class_attention=inf), None, r"'class_attention' has to be finite but holds 0 NaN and 1 inf values$"),
        (dict(class_attention=c[:, :3]), None,
         r"'features' and 'class_attention' have to share one grid but are 4x5 and 3x5$"),
        (dict(class_attention=c[:20], label_classes=json.dumps(labels[:20])), "voc",
         r"'class_attention' has 20 classes but label set 'voc' has 21$"),
        (dict(label_classes=json.dumps(labels[:20])), None,
         r"'class_attention' has 21 classes but metadata 'label_classes' lists 20$"),
        (dict(label_classes=json.dumps(labels)), "voc",
         r"'label_classes' disagree with label set 'voc' at index 3: 'birb' in the file, 'bird' in the set$"),
        (dict(format_version="4"), None, r"unknown format_version '4' \(this pccfast reads '1', '2' and '3'\)$"),
        (dict(format_version=None), None, r"metadata 'format_version' is missing \(expected '3'\)$"),
        (dict(format_version="3"), None, r"metadata 'grid', 'halves' missing \(a capture holds .*grid, halves\)$"),
        (dict(format_version="3", grid="5,4", halves="2"), None,
         r"metadata 'grid' says 5x4 but the tensors are 4x5 \(h x w\)$"),
        (dict(format_version="3", grid="4x5", halves="2"), None, r"metadata 'grid' has to be 'h,w' but is '4x5'$"),
        (dict(format_version="3", grid="4,5", halves="3"), None,
         r"metadata 'halves' has to be 1, 2 or empty but is '3'$"),
        (dict(image=torch.zeros(3, 8, 10, dtype=torch.float32)), None, r"'image' has to be uint8 but has dtype torch.float32$"),
        (dict(image=torch.zeros(8, 10, 3, dtype=torch.uint8)), None,
         r"'image' has to be \(3, H, W\) \(RGB, channels first\) but has shape \(8, 10, 3\)$"),
        (dict(image=torch.zeros(3, 8, 12, dtype=torch.uint8)), None,
         r"'image' is 12x8 \(width x height\) but has to be a multiple of the capture grid 5x4$"),
        (dict(prompt=None, seed=None), None, r"metadata 'prompt', 'seed' missing \(a capture holds"),
        (dict(classes="cat"), None, r"metadata 'classes' has to be a JSON list of strings but is 'cat'$"),
        (dict(steps="80.5"), None, r"metadata 'steps' has to be an integer or empty but is '80.5'$"),
    ]


def test_exception_messages(tmp_path):
    """Every bad input gives one line that starts with the file's path and says what was expected."""
    cases = _bad_cases()
    for i, (kw, label_set, pattern) in enumerate(cases):
        path = _bad(tmp_path, name=f"{i}.safetensors", **kw)
        with pytest.raises(CaptureError) as info:
            read_capture(path, label_set)
        msg = str(info.value)
        assert isinstance(info.value, ValueError)
        assert "\n" not in msg
        assert msg.startswith(path + ": "), msg
        assert re.search(pattern, msg), (pattern, msg)
    # the label set given by name is checked, not just the file's own consistency
    assert read_capture(_bad(tmp_path, name="ok.safetensors"), "voc").class_attention.shape[0] == 21


def test_exception_unreadable(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(CaptureError, match=r"nope\.safetensors: cannot read the capture: No such file"):
        read_capture(missing)

    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CaptureError, match=r"tiny\.safetensors: not a safetensors file \(only 3 bytes\)$"):
        read_capture(str(tiny))

    jpeg = tmp_path / "jpeg.safetensors"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    with pytest.raises(CaptureError, match=r"jpeg\.safetensors: not a safetensors file or truncated \(header of"):
        read_capture(str(jpeg))

    # a valid file cut short: the header is intact, the tensor data is not
    good = _bad(tmp_path, name="cut.safetensors")
    data = open(good, "rb").read()
    open(good, "wb").write(data[:-40])
    with pytest.raises(CaptureError) as info:
        read_capture(good)
    assert str(info.value).startswith(good + ": corrupt safetensors file: ")
    assert "\n" not in str(info.value)

    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(CaptureError, match=r"garbled\.safetensors: not a safetensors file \(the header is not JSON\)$"):
        read_capture(str(garbled))


def test_write_rejects_bad_tensors(tmp_path):
    f, c = _pair()
    path = str(tmp_path / "w.safetensors")
    kw = dict(prompt="", classes=[], seed=0, model="m", steps=1)
    with pytest.raises(CaptureError, match=r"w\.safetensors: 'class_attention' has 20 classes but label set 'voc' has 21$"):
        write_capture(path, f, c[:20], label_set="voc", **kw)
    bad = f.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(CaptureError, match=r"'features' has to be finite"):
        write_capture(path, bad, c, label_set="voc", **kw)
    with pytest.raises(CaptureError, match=r"`classes` has to be a list of class names but is 'cat'"):
        write_capture(path, f, c, label_set="voc", **{**kw, "classes": "cat"})
    with pytest.raises(CaptureError, match=r"`label_set` has to be one of voc, coco"):
        write_capture(path, f, c, label_set="nonexistent", **kw)
    assert not os.path.exists(path) and os.listdir(tmp_path) == []


def test_write_seed_kinds(tmp_path):
    """Seeds and steps may be NumPy or 0-dim tensor ints; floats and bools are refused."""
    import numpy as np

    f, c = _pair()
    path = str(tmp_path / "s.safetensors")
    write_capture(path, f, c, label_set="voc", prompt="", classes=[], seed=np.int64(5), model="m", steps=torch.tensor(3))
    meta = read_capture(path).metadata
    assert (meta["seed"], meta["steps"]) == (5, 3)
    for bad in (1.5, True, "7"):
        with pytest.raises(CaptureError, match=r"`seed` has to be an int or None but is "):
            write_capture(path, f, c, label_set="voc", prompt="", classes=[], seed=bad, model="m", steps=1)


def _image(h=8, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)  # (3, H, W)


def test_image_round_trip(tmp_path, device):
    """format_version 2: the decoded image (3, H, W) uint8 is stored and read back exactly."""
    features, class_attention = _pair()
    image = _image()
    path = str(tmp_path / "i.safetensors")
    write_capture(path, features.to(device), class_attention.to(device), label_set="voc", prompt="p", classes=["cat"],
                  seed=1, model="m", steps=2, image=image.to(device))
    cap = read_capture(path, "voc")
    assert cap.image.dtype == torch.uint8 and cap.image.device.type == "cpu"
    assert torch.equal(cap.image, image)
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == ["class_attention", "features", "image"]
        assert f.metadata()["format_version"] == "3"
    info = read_capture_info(path)
    assert (info.label_set, info.label_classes, info.has_image) == ("voc", list(VOC_CLASSES), True)


def test_write_rejects_bad_image(tmp_path):
    f, c = _pair()
    path = str(tmp_path / "w.safetensors")
    kw = dict(label_set="voc", prompt="", classes=[], seed=0, model="m", steps=1)
    with pytest.raises(CaptureError, match=r"w\.safetensors: 'image' has to be uint8 but has dtype torch.float32$"):
        write_capture(path, f, c, image=torch.zeros(3, 8, 10), **kw)
    with pytest.raises(CaptureError, match=r"'image' has to be \(3, H, W\) \(RGB, channels first\) but has shape \(8, 10, 3\)$"):
        write_capture(path, f, c, image=torch.zeros(8, 10, 3, dtype=torch.uint8), **kw)
    with pytest.raises(CaptureError, match=r"'image' is 9x8 \(width x height\) but has to be a multiple of the capture grid 5x4$"):
        write_capture(path, f, c, image=torch.zeros(3, 8, 9, dtype=torch.uint8), **kw)
    with pytest.raises(CaptureError, match=r"'image' has to be a torch.Tensor but is ndarray$"):
        import numpy as np

        write_capture(path, f, c, image=np.zeros((3, 8, 10), np.uint8), **kw)
    assert os.listdir(tmp_path) == []


def test_version_1_still_read(tmp_path):
    """Regression: captures written before format_version 2 (no image, version "1") stay readable."""
    path = _bad(tmp_path, name="v1.safetensors")  # good_metadata writes format_version "1"
    cap = read_capture(path, "voc")
    assert cap.metadata["format_version"] == "1" and cap.image is None
    assert cap.class_attention.shape == (21, 4, 5)
    info = read_capture_info(path)
    assert info.has_image is False and info.label_set == "voc" and info.metadata["format_version"] == "1"


def test_info_reads_only_the_header(tmp_path):
    """read_capture_info needs the header only: a file whose tensor data is cut off still
    gives its label set (read_capture refuses it)."""
    ls = get_label_set("coco")
    f, _ = _pair()
    path = str(tmp_path / "c.safetensors")
    write_capture(path, f, torch.rand(81, 4, 5), label_set=ls, prompt="", classes=[], seed=0, model="m", steps=1,
                  image=_image())
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    info = read_capture_info(path)
    assert info.label_set == "coco" and len(info.label_classes) == 81 and info.has_image
    with pytest.raises(CaptureError, match="corrupt safetensors file"):
        read_capture(path)
    with pytest.raises(CaptureError, match=r"unknown format_version '9'"):
        read_capture_info(_bad(tmp_path, name="v9.safetensors", format_version="9"))


def test_grid_and_halves_recorded(tmp_path):
    """format_version 3 records the (h, w) grid (non-square here) and the guidance halves."""
    features, class_attention = torch.rand(12, 8, 12), torch.rand(21, 8, 12)
    path = str(tmp_path / "g.safetensors")
    write_capture(path, features, class_attention, label_set="voc", prompt="p", classes=["cat"], seed=1, model="m",
                  steps=1, image=torch.zeros(3, 64, 96, dtype=torch.uint8), halves=1)
    cap = read_capture(path, "voc")
    assert cap.grid == (8, 12) and cap.metadata["grid"] == (8, 12) and cap.metadata["halves"] == 1
    assert read_capture_info(path).grid == (8, 12)
    with pytest.raises(CaptureError, match=r"`halves` has to be 1, 2 or None but is 3$"):
        write_capture(path, features, class_attention, label_set="voc", prompt="p", classes=[], seed=1, model="m",
                      steps=1, halves=3)


def test_old_versions_read_with_grid_and_both_halves(tmp_path):
    """Regression: version 1/2 files record no grid or halves; they read as the tensors' grid
    and both guidance halves (all of them came from guided runs)."""
    cap = read_capture(_bad(tmp_path, name="v1.safetensors"))
    assert cap.metadata["grid"] == cap.grid and cap.metadata["halves"] == 2
