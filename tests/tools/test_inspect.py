import json
import os
import re
import subprocess
import sys
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from pccfast.data.fileio import save_image, save_mask_png
from pccfast.cli.inspect import main
from pccfast.tools.inspection import (
    contact_sheet,
    dataset_stats,
    find_samples,
    overlay,
    suspicious_reasons,
)
from pccfast.data.labelsets import get_label_set

VOC = get_label_set("voc")
DOG, CAT, SOFA, BIRD = (VOC.index(c) for c in ("dog", "cat", "sofa", "bird"))


def make_dataset(root, extra=False):
    """3 images 64x64 with masks, blocky masks (16x16), manifest and labelset.json;
    ``extra`` plants suspicious cases: all background, 95% uncertain, a mask without image."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    pal = VOC.flat_palette()
    specs = [  # id, classes in the prompt, labels painted in the mask
        ("0", ["dog"], [DOG]),
        ("1", ["cat", "sofa"], [CAT]),  # sofa missing
        ("2", ["cat", "dog"], [CAT, DOG]),
    ]
    if extra:
        specs += [("3", ["bird"], []), ("4", ["dog"], [DOG])]
    records = []
    for i, classes, labels in specs:
        img = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
        save_image(str(root / "JPEGImages" / f"{i}.jpg"), img)
        mask = np.zeros((64, 64), np.uint8)
        for j, v in enumerate(labels):
            mask[8 + 24 * j : 28 + 24 * j, 10:50] = v
            mask[6 + 24 * j : 8 + 24 * j, 10:50] = 255  # an uncertain band
        if i == "4":
            mask[:] = 255
            mask[:6, :6] = DOG  # 36 of 4096 pixels: 99% uncertain
        save_mask_png(str(root / "SegmentationClass" / f"{i}.png"), mask, pal)
        save_mask_png(str(root / "SegmentationClassBlocky" / f"{i}.png"), mask[::4, ::4], pal)
        records.append({"id": i, "prompt": f"prompt {i}", "classes": classes, "seed": 2024 + int(i)})
    if extra:
        save_mask_png(str(root / "SegmentationClass" / "orphan.png"), np.full((64, 64), DOG, np.uint8), pal)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "labelset.json").write_text(json.dumps(VOC.to_json()))
    return root


def test_overlay_value():
    img = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[0, DOG], [255, 0]], np.uint8)
    out = overlay(img, mask, VOC.palette, alpha=0.55)
    assert out[0, 0].tolist() == [100, 100, 100]  # background untinted
    # dog is (64, 0, 128): 0.45 * 100 + 0.55 * c
    assert out[0, 1].tolist() == [80, 45, 115]
    assert out[1, 0].tolist() == [168, 168, 151]  # uncertain (224, 224, 192)
    big = overlay(np.full((4, 4, 3), 100, np.uint8), mask, VOC.palette)  # mask upsampled nearest
    assert big[0, 3].tolist() == [80, 45, 115] and big[3, 0].tolist() == [168, 168, 151]


def test_suspicious_reasons_value():
    counts = np.zeros(256, np.int64)
    counts[0] = 100
    assert suspicious_reasons(counts, VOC, ["dog"]) == ["all background", "prompt class 'dog' absent from the mask"]
    counts[255] = 1000
    assert suspicious_reasons(counts, VOC, []) == ["no class pixels (background and uncertain only)", "91% uncertain"]
    counts[DOG] = 50
    counts[40] = 3
    assert suspicious_reasons(counts, VOC, ["Dog", "dog", "unicorn"]) == [
        "labels outside the label set: [40]", "prompt class 'unicorn' is not in label set 'voc'"]
    counts[255] = 0
    assert suspicious_reasons(counts, VOC, ["dog"], uncertain_max=0.9) == ["labels outside the label set: [40]"]


def test_suspicious_detection_on_planted_cases(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", extra=True)
    samples = find_samples(str(root))
    assert [s.id for s in samples] == ["0", "1", "2", "3", "4", "orphan"]
    stats = dataset_stats(samples, VOC)
    reasons = {s.id: s.reasons for s in stats.suspicious}
    assert set(reasons) == {"1", "3", "4", "orphan"}
    assert reasons["1"] == ["prompt class 'sofa' absent from the mask"]
    assert reasons["3"] == ["all background", "prompt class 'bird' absent from the mask"]
    assert reasons["4"] == ["99% uncertain"]
    assert reasons["orphan"] == ["no image file"]
    # dog fills 20x40 in 0, 20x40 in 2, 36 px in 4, all of orphan; 6 masks of 4096 px
    dog = (800 + 800 + 36 + 4096) / (6 * 4096)
    assert stats.class_share[DOG] == pytest.approx(dog)
    assert stats.image_share[DOG] == pytest.approx(4 / 6)
    assert stats.class_share.sum() + stats.uncertain_share == pytest.approx(1.0)
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "suspicious images: 4" in out and "  3: all background" in out
    assert "most uncertain: 4 99.1%" in out


def test_png_contact_sheet(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    png = tmp_path / "sheet.png"
    assert main([str(root), "--out", str(png), "--size", "64", "--json", str(tmp_path / "s.json")]) == 0
    assert "suspicious images: 1" in capsys.readouterr().out
    with Image.open(png) as im:
        im.load()
        box = tuple(int(v) for v in im.text["legend_box"].split(","))
        rgb = np.asarray(im.convert("RGB"))
    assert im.width == 4 + 3 * (64 + 4)  # image | blocky | refined
    assert box[3] == im.height and box[1] > 3 * 64
    legend = {tuple(c) for c in rgb[box[1] : box[3], box[0] : box[2]].reshape(-1, 3)}
    for v in (DOG, CAT, 255):  # the classes shown (and uncertain) have swatches
        assert tuple(VOC.palette[v]) in legend
    assert tuple(VOC.palette[SOFA]) not in legend and tuple(VOC.palette[1]) not in legend
    # row 0's refined overlay is tinted with dog where the mask is dog: 0.45 * image + 0.55 * dog colour
    img = np.asarray(Image.open(root / "JPEGImages" / "0.jpg").convert("RGB").resize((64, 64), Image.BILINEAR))
    expected = overlay(img, np.asarray(Image.open(root / "SegmentationClass" / "0.png")), VOC.palette)
    x0 = 4 + 2 * (64 + 4)
    found = any(np.array_equal(rgb[y : y + 64, x0 : x0 + 64], expected) for y in range(0, box[1] - 63))
    assert found, "the refined overlay of row 0 is not on the sheet"
    data = json.loads((tmp_path / "s.json").read_text())
    assert [r["id"] for r in data["images"]] == ["0", "1", "2"]


def test_contact_sheet_without_blocky_and_limit(tmp_path):
    root = make_dataset(tmp_path / "ds")
    for f in (root / "SegmentationClassBlocky").iterdir():
        f.unlink()
    samples = find_samples(str(root))
    sheet = contact_sheet(samples[:2], VOC, size=32)
    assert sheet.image.width == 4 + 2 * (32 + 4) and sheet.ids == ["0", "1"]
    legend = {tuple(c) for c in np.asarray(sheet.image.crop(sheet.legend_box)).reshape(-1, 3)}
    assert tuple(VOC.palette[CAT]) in legend and tuple(VOC.palette[DOG]) in legend


def test_html_page_references_existing_files(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", extra=True)
    os.unlink(root / "SegmentationClassBlocky" / "2.png")
    page = tmp_path / "report" / "page.html"
    page.parent.mkdir()  # --out's folder has to exist (tests/cli/test_errors.py)
    assert main([str(root), "--out", str(page), "--limit", "10"]) == 0
    text = page.read_text()
    refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", text)
    files = [r for r in refs if not r.startswith("#")]
    assert files and all((page.parent / unquote(r)).resolve().is_file() for r in files), files
    assert any(r.startswith("../ds/JPEGImages/") for r in files)
    assert "../ds/SegmentationClassBlocky/0.png" in files and "../ds/SegmentationClassBlocky/2.png" not in files
    assert "../ds/SegmentationClass/orphan.png" in files and "orphan.jpg" not in text
    anchors = [r[1:] for r in refs if r.startswith("#")]
    assert set(anchors) == {"1", "3", "4", "orphan"} and all(f"id='{a}'" in text for a in anchors)
    assert "prompt class &#x27;sofa&#x27; absent from the mask" in text
    page2 = tmp_path / "only.html"
    assert main([str(root), "--out", str(page2), "--suspicious"]) == 0
    rows = re.findall(r"<tr id='([^']+)'>", page2.read_text())
    assert rows == ["1", "3", "4", "orphan"]


def test_exceptions(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "not a dataset folder?" in capsys.readouterr().err
    root = make_dataset(tmp_path / "ds")
    assert main([str(root), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "`--out` has to end in .png or .html" in capsys.readouterr().err


def test_module_runs_as_python_m_pccfast_inspect(tmp_path):
    """``python -m pccfast.inspect`` still works; the code lives in pccfast.tools.inspection
    (no module of the package that holds code is named like the standard library's inspect)."""
    root = make_dataset(tmp_path / "ds")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo)
    res = subprocess.run([sys.executable, "-m", "pccfast.inspect", str(root)], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "suspicious images: 1" in res.stdout
