"""The README's lines that load each layout run as printed (OUT replaced by real datasets)."""
import os
import re

import numpy as np
import pytest

from pccfast.runs.export import run_export
from pccfast.testing.planted_datasets import planted_sample, write_planted_voc

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def _blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("**Loading each layout.**"):]
    section = section[: section.index("\n### ")] if "\n### " in section else section
    return re.findall(r"^```\n(.*?)^```", section, flags=re.S | re.M)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    pytest.importorskip("pyarrow")
    root = tmp_path_factory.mktemp("layouts")
    write_planted_voc(str(root / "voc"), 6, size=32)
    run_export(str(root / "voc"), "webdataset", str(root / "wds"), shard_size=4, progress=False)
    run_export(str(root / "wds"), "parquet", str(root / "pq"), shard_size=4, progress=False)
    return root


def _run(block, out, monkeypatch):
    monkeypatch.chdir(out)  # the blocks name the dataset "OUT"
    scope = {}
    exec(compile(block.replace('"OUT"', '"."').replace('"OUT/', '"./'), "README.md", "exec"), scope)
    return scope


def test_the_readme_has_the_loading_blocks():
    blocks = _blocks()
    assert len(blocks) == 4
    assert "load_dataset" in blocks[0] and "webdataset" in blocks[1] and "parquet" in blocks[2]
    assert "VOCSegmentation" in blocks[3] and "reduce_zero_label=False" in blocks[3]


def test_pccfast_block(layouts, monkeypatch):
    for name in ("voc", "wds", "pq"):
        scope = _run(_blocks()[0], layouts / name, monkeypatch)
        assert int(scope["record"]["id"]) == 5 and (scope["mask"] == planted_sample(5, 32)[1]).all()


def test_webdataset_block(layouts, monkeypatch):
    pytest.importorskip("webdataset")
    ds = _run(_blocks()[1], layouts / "wds", monkeypatch)["ds"]
    got = {record["id"]: mask for _, mask, record in ds}
    assert sorted(got) == [f"{i:06d}" for i in range(6)]
    assert all((m == planted_sample(int(i), 32)[1]).all() for i, m in got.items())


def test_hugging_face_block(layouts, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(layouts / "hf-cache"))
    scope = _run(_blocks()[2], layouts / "pq", monkeypatch)
    assert (scope["mask"] == planted_sample(int(scope["ds"][0]["id"]), 32)[1]).all()
    assert scope["image"].size == (32, 32)
