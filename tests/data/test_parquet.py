"""Parquet files: the schema Hugging Face datasets decodes, the label set in the metadata, repair, pyarrow missing."""
import importlib.util
import io
import json

import numpy as np
import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from pccfast.core.labelset import as_label_set  # noqa: E402
from pccfast.data import parquet as pqmod  # noqa: E402
from pccfast.data.fileio import encode_image, encode_mask_png  # noqa: E402
from pccfast.data.parquet import ParquetStore, ParquetWriter, parquet_label_set  # noqa: E402
from pccfast.testing.planted_datasets import planted_sample  # noqa: E402

VOC = as_label_set("voc")


def _samples(ids, blocky=False):
    out = []
    for sid in ids:
        image, mask, labels = planted_sample(int(sid), 32)
        files = {"image": encode_image(image), "mask": encode_mask_png(mask, VOC.flat_palette())}
        if blocky:
            files["blocky"] = files["mask"]
        record = dict(id=sid, index=int(sid), prompt=f"p {sid}", classes=[VOC.classes[v] for v in labels],
                      seed=2024 + int(sid), model="planted", steps=None, seconds=0.5)
        out.append((sid, files, record))
    return out


def test_columns_features_and_label_set(tmp_path):
    store = ParquetStore(str(tmp_path), VOC)
    writer = ParquetWriter(str(tmp_path), VOC, run={"defining": {"model": "planted"}})
    samples = _samples(["0", "1", "2"], blocky=True)
    for r in writer.write_file(samples):
        store.commit(r)
    assert store.finalize() == ["0", "1", "2"]
    path = tmp_path / "data" / "train-000000.parquet"
    schema = pq.read_schema(path)
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"} and features["mask"] == {"_type": "Image"}
    assert parquet_label_set(str(path))["classes"] == list(VOC.classes)
    assert json.loads(schema.metadata[b"pccfast.run"]) == {"defining": {"model": "planted"}}
    rows = pq.read_table(path).to_pylist()
    assert [r["id"] for r in rows] == ["0", "1", "2"]
    for (sid, files, record), row in zip(samples, rows):
        assert row["image"] == {"bytes": files["image"], "path": f"{sid}.jpg"}
        assert row["mask"]["bytes"] == files["mask"] and row["blocky"]["bytes"] == files["mask"]
        assert row["prompt"] == record["prompt"] and row["classes"] == record["classes"]
        assert row["seed"] == record["seed"] and row["model"] == "planted"
        assert json.loads(row["record"]) == record


def test_hugging_face_datasets_decodes_images_and_masks(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    store = ParquetStore(str(tmp_path), VOC)
    writer = ParquetWriter(str(tmp_path), VOC)
    ids = [str(i) for i in range(7)]
    for k in range(0, 7, 4):
        for r in writer.write_file(_samples(ids[k:k + 4])):
            store.commit(r)
    store.finalize()
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "data" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["mask"], datasets.Image)
    assert sorted(ds["id"]) == ids
    for row in ds:
        mask = row["mask"]
        assert mask.mode == "P"
        assert (np.asarray(mask) == planted_sample(int(row["id"]), 32)[1]).all()
        assert row["image"].size == (32, 32) and row["seed"] == 2024 + int(row["id"])


def test_repair_rewrites_a_partly_committed_file_and_removes_an_uncommitted_one(tmp_path):
    store = ParquetStore(str(tmp_path), VOC)
    writer = ParquetWriter(str(tmp_path), VOC)
    recs = writer.write_file(_samples(["0", "1", "2"]))
    store.commit(recs[0])
    store.commit(recs[2])  # killed while committing: "1" never was
    writer.write_file(_samples(["3"]))  # written, never committed
    again = ParquetStore(str(tmp_path), VOC)
    assert again.done_ids() == {"0", "2"}
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["train-000000.parquet"]
    assert pq.read_table(tmp_path / "data" / "train-000000.parquet").column("id").to_pylist() == ["0", "2"]


def test_without_pyarrow_one_line_says_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(ImportError) as info:
        ParquetWriter(str(tmp_path), VOC)
    assert str(info.value) == pqmod.INSTALL_HINT and "pip install \"pccfast[parquet]\"" in str(info.value)
    with pytest.raises(ImportError, match=r"pccfast\[parquet\]"):
        ParquetStore(str(tmp_path / "o"), VOC)


def test_images_are_stored_not_reencoded(tmp_path):
    writer = ParquetWriter(str(tmp_path), VOC)
    (sid, files, record), = _samples(["5"])
    writer.write_file([(sid, files, record)])
    row = pq.read_table(tmp_path / "data" / "train-000000.parquet").to_pylist()[0]
    assert row["image"]["bytes"] == files["image"]
    assert Image.open(io.BytesIO(row["image"]["bytes"])).format == "JPEG"
