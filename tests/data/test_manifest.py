"""The dataset writer: atomic samples, manifest as commit point, resume, torn lines, ids."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from pccfast.data.layout import sample_paths as dataset_paths
from pccfast.data.manifest import Manifest
from pccfast.data.writer import SampleWriter
from pccfast.data.fileio import append_line, check_id, read_jsonl
from pccfast.data.labelsets import get_label_set

def _dataset(out, label_set, shard=None, **kw):
    """The two roles of a generated dataset side by side: the driver's manifest and the worker's writer."""
    import types

    m, w = Manifest(out, label_set, shard), SampleWriter(out, label_set, **kw)
    return types.SimpleNamespace(write_files=w.write_files, done_ids=m.done_ids, commit=m.commit,
                                 finalize=m.finalize, write_plan=m.write_plan)



def _sample(seed, h=32, w=32):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 8, 15, 255], dtype=np.uint8), (h, w))
    return img, mask


def test_write_commit_resume(tmp_path):
    voc = get_label_set("voc")
    w = _dataset(str(tmp_path), voc, save_blocky=True)
    img, mask = _sample(0)
    w.write_files("a", img, mask, blocky=mask)
    assert w.done_ids() == set()  # files without a manifest line are not done
    w.commit({"id": "a", "index": 0})
    assert w.done_ids() == {"a"}
    ids = w.finalize()
    assert ids == ["a"]
    split = (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text()
    assert split == "a\n"
    png = Image.open(dataset_paths(str(tmp_path), "a")["mask"])
    assert png.mode == "P"
    assert np.array_equal(np.asarray(png), mask)
    assert png.getpalette()[15 * 3 : 15 * 3 + 3] == [192, 128, 128]  # VOC person
    assert png.getpalette()[255 * 3 : 255 * 3 + 3] == [224, 224, 192]
    labelset = json.loads((tmp_path / "labelset.json").read_text())
    assert labelset["classes"][15] == "person"
    # no temporary files anywhere
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.startswith(".tmp-")]
    assert leftovers == []


def test_done_requires_files(tmp_path):
    voc = get_label_set("voc")
    w = _dataset(str(tmp_path), voc)
    w.commit({"id": "ghost", "index": 0})
    assert w.done_ids() == set()


def test_label_set_mismatch_refused(tmp_path):
    _dataset(str(tmp_path), get_label_set("voc"))
    with pytest.raises(ValueError, match="label set 'voc'.*not 'coco'"):
        _dataset(str(tmp_path), get_label_set("coco"))


def test_torn_manifest_line_is_skipped_and_healed(tmp_path):
    """Regression: a kill -9 during an append left half a JSON line that swallowed the next record."""
    p = str(tmp_path / "manifest.jsonl")
    append_line(p, json.dumps({"id": "1"}))
    with open(p, "a") as f:
        f.write('{"id": "2", "pro')
    append_line(p, json.dumps({"id": "3"}))
    assert [r["id"] for r in read_jsonl(p)] == ["1", "3"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "a\nb", "", "a\\b"])
def test_check_id_refuses_paths(bad):
    with pytest.raises(ValueError, match="not a plain file name"):
        check_id(bad)


def test_writer_refuses_bad_id(tmp_path):
    img, mask = _sample(1)
    w = _dataset(str(tmp_path), get_label_set("voc"))
    with pytest.raises(ValueError, match="not a plain file name"):
        w.write_files("../evil", img, mask)
    assert not (tmp_path.parent / "evil.png").exists()
