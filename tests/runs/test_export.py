"""``export`` between the layouts: round trips byte for byte, the readers, resume, refusals."""
import filecmp
import json
import os
import tarfile

import numpy as np
import pytest

from pccfast.core.labelset import as_label_set
from pccfast.data import load_dataset
from pccfast.data.layout import sample_paths
from pccfast.data.shards import ShardWriter
from pccfast.runs.export import run_export
from pccfast.testing.planted_datasets import planted_sample, write_planted_voc

pytest.importorskip("pyarrow")
VOC = as_label_set("voc")


def _records(out):
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def _strip(records):
    return [{k: v for k, v in r.items() if k != "shard"} for r in records]


def _same_voc(a, b, ids):
    """Every file of every sample byte-identical, the same records and split."""
    for sid in ids:
        pa, pb = sample_paths(str(a), sid), sample_paths(str(b), sid)
        for key in ("image", "mask", "blocky", "capture"):
            assert os.path.exists(pa[key]) == os.path.exists(pb[key]), (sid, key)
            if os.path.exists(pa[key]):
                assert filecmp.cmp(pa[key], pb[key], shallow=False), (sid, key)
    assert _records(a) == _records(b)
    split = os.path.join("ImageSets", "Segmentation", "train.txt")
    assert (a / split).read_text() == (b / split).read_text()
    assert (a / "labelset.json").read_text() == (b / "labelset.json").read_text()


def _round_trip(src, tmp_path, shard_size):
    wds, parquet, back = tmp_path / "wds", tmp_path / "pq", tmp_path / "back"
    for s, to, o in ((src, "webdataset", wds), (wds, "parquet", parquet), (parquet, "voc", back)):
        report = run_export(str(s), to, str(o), shard_size=shard_size, batch=16, progress=False)
        assert report.ok and report.failures == []
    return wds, parquet, back


def _planted(src, n, monkeypatch, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", lambda fd: None)  # the input's durability is not under test: faster to make
        return write_planted_voc(str(src), n, **kwargs)


def test_round_trip_of_planted_samples_is_byte_identical(tmp_path, monkeypatch):
    src = tmp_path / "voc"
    ids = _planted(src, 200, monkeypatch, size=32, blocky_every=7)
    wds, parquet, back = _round_trip(src, tmp_path, shard_size=64)
    _same_voc(src, back, ids)
    assert sorted(os.listdir(wds / "shards")) == [f"train-00000{i}.tar" for i in range(4)]
    assert json.loads((wds / "shards.json").read_text())["samples"] == 200
    assert [s["samples"] for s in json.loads((wds / "shards.json").read_text())["shards"]] == [64, 64, 64, 8]
    assert sorted(os.listdir(parquet / "data")) == [f"train-00000{i}.parquet" for i in range(4)]
    # every layout's manifest holds the same records, plus where the sample is
    assert _strip(_records(wds)) == _strip(_records(parquet)) == _records(src)
    assert {r["shard"] for r in _records(wds)} == set(os.listdir(wds / "shards"))


def test_round_trip_of_the_tiny_model_dataset(tmp_path, tiny_pipe):
    """generate (VOC, with blocky masks and captures) -> webdataset -> parquet -> voc."""
    from pccfast.core.config import PCCConfig
    from pccfast.data.prompt_bank import builtin_prompts
    from pccfast.diffusion.settings import GenerationConfig
    from pccfast.runs.generate import run_generation

    src = tmp_path / "voc"
    entries = builtin_prompts(VOC)[:6]
    settings = GenerationConfig(model="tiny", steps=2, height=64, width=64)
    report = run_generation(entries, settings, PCCConfig(), VOC, str(src), batch=3, progress=False, pipe=tiny_pipe,
                            save_blocky=True, save_captures=True)
    assert report.done == 6
    wds, parquet, back = _round_trip(src, tmp_path, shard_size=4)
    _same_voc(src, back, [e.id for e in entries])
    assert (json.loads((back / "run.json").read_text())["defining"] ==
            json.loads((src / "run.json").read_text())["defining"])


def test_load_dataset_reads_every_layout_alike(tmp_path):
    src = tmp_path / "voc"
    ids = write_planted_voc(str(src), 20, size=32)
    wds, parquet, _ = _round_trip(src, tmp_path, shard_size=8)
    for path in (src, wds, parquet):
        got = list(load_dataset(str(path)))
        assert [r["id"] for _, _, r in got] == ids
        for image, mask, record in got:
            i = int(record["id"])
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
            assert (mask == planted_sample(i, 32)[1]).all()
            assert record["prompt"] == f"a planted scene {i}" and "shard" not in record


def test_an_interrupted_export_resumes_with_every_id_once(tmp_path, monkeypatch):
    src = tmp_path / "voc"
    ids = write_planted_voc(str(src), 40, size=32)
    out = tmp_path / "wds"
    calls = []
    real = ShardWriter.write_encoded

    def interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 13:  # in the second batch of 8
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write_encoded", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_export(str(src), "webdataset", str(out), shard_size=16, batch=8, progress=False, io_threads=0)
    monkeypatch.undo()
    assert len(_records(out)) == 8  # the first batch is committed; the second was in flight
    report = run_export(str(src), "webdataset", str(out), shard_size=16, batch=8, progress=False)
    assert len(report.skipped) == 8 and report.done == 32
    keys = []
    for name in sorted(os.listdir(out / "shards")):
        with tarfile.open(out / "shards" / name) as t:
            keys += [m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".json")]
    assert sorted(keys) == ids
    assert [r["id"] for _, _, r in load_dataset(str(out))] == ids


def test_refusals_are_one_line(tmp_path):
    src = tmp_path / "voc"
    write_planted_voc(str(src), 3, size=32)
    with pytest.raises(ValueError, match="is the source dataset"):
        run_export(str(src), "voc", str(src))
    with pytest.raises(ValueError, match="`--to` has to be one of voc, webdataset, parquet but is 'tar'"):
        run_export(str(src), "tar", str(tmp_path / "o"))
    with pytest.raises(ValueError, match="`shard_size` has to be a positive int but is 0"):
        run_export(str(src), "parquet", str(tmp_path / "o"), shard_size=0)
    with pytest.raises(ValueError, match="not a dataset folder"):
        run_export(str(tmp_path / "nothing"), "voc", str(tmp_path / "o"))
    run_export(str(src), "webdataset", str(tmp_path / "w"), progress=False)
    with pytest.raises(ValueError, match="holds a webdataset dataset, not parquet"):
        run_export(str(src), "parquet", str(tmp_path / "w"), progress=False)
    other = tmp_path / "other"
    write_planted_voc(str(other), 3, size=32, seed=5)
    with pytest.raises(ValueError, match=r"was made with seed .0 \+ index. but this run has .5 \+ index."):
        run_export(str(other), "webdataset", str(tmp_path / "w"), progress=False)


@pytest.mark.slow
def test_export_memory_does_not_grow_with_the_images(tmp_path, monkeypatch):
    """Streaming: the peak of Python allocations exporting 450 samples exceeds that of 150 by
    far less than the 300 extra images would take (their locators and records only: measured
    about 3 KB per sample, against some 40 KB per image here)."""
    import tracemalloc

    peaks, image_bytes = {}, {}
    for n in (150, 450):
        src = tmp_path / f"voc{n}"
        _planted(src, n, monkeypatch, size=256)
        image_bytes[n] = sum(f.stat().st_size for f in (src / "JPEGImages").iterdir())
        tracemalloc.start()
        run_export(str(src), "webdataset", str(tmp_path / f"wds{n}"), batch=16, progress=False)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    extra_images = image_bytes[450] - image_bytes[150]
    assert extra_images > 8_000_000  # the test means something: the images are large
    assert peaks[450] - peaks[150] < 0.25 * extra_images, (peaks, extra_images)
