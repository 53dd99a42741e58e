"""merge of webdataset outputs (generate --format webdataset): completeness by tar, the index, tars into --out."""
import json
import os

import pytest

from pccfast.cli.merge import main as merge_main
from pccfast.data.labelsets import get_label_set

VOC = get_label_set("voc")


def _wds_run(out, ids, shard=None, prompt="p", commit=True):
    """What a (sharded) webdataset run leaves: its plan, its tars, its committed records."""
    from pccfast.data.shards import ShardStore, ShardWriter
    from pccfast.testing.planted_datasets import planted_sample

    store = ShardStore(str(out), VOC, shard)
    store.write_plan(ids)
    writer = ShardWriter(str(out), VOC, shard_size=3, prefix=store.prefix)
    for sid in ids:
        image, mask, _ = planted_sample(int(sid), 16)
        r = writer.write_files(sid, image, mask, record=dict(id=sid, index=int(sid), prompt=f"{prompt}{sid}"))
        writer.end_batch()
        if commit:
            store.commit(r)
    store.finalize()


def _wds_keys(out):
    import tarfile

    keys = []
    for name in sorted(os.listdir(out / "shards")):
        with tarfile.open(out / "shards" / name) as t:
            keys += [m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".png")]
    return keys


def test_webdataset_shards_merge_in_place_with_an_index(tmp_path, capsys):
    ids = [str(i) for i in range(10)]
    _wds_run(tmp_path, [i for i in ids if int(i) % 2 == 0], shard=(0, 2))
    _wds_run(tmp_path, [i for i in ids if int(i) % 2 == 1], shard=(1, 2))
    assert not (tmp_path / "shards.json").exists()  # sharded runs leave the index to merge
    assert merge_main([str(tmp_path)]) == 0
    assert "10 samples" in capsys.readouterr().err and not (tmp_path / "ImageSets").exists()
    records = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ids
    index = json.loads((tmp_path / "shards.json").read_text())
    assert index["samples"] == 10 and sum(s["samples"] for s in index["shards"]) == 10
    assert {s["name"] for s in index["shards"]} == {f"train-shard-{i}-of-2-00000{k}.tar" for i in range(2)
                                                   for k in range(2)}
    assert sorted(_wds_keys(tmp_path)) == ids


def test_webdataset_dirs_merge_into_out_renaming_clashing_tars(tmp_path, capsys):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _wds_run(a, ["0", "1", "2", "3"])
    _wds_run(b, ["4", "5"])  # also train-000000.tar
    assert merge_main([str(a), str(b), "--out", str(out)]) == 0
    assert sorted(os.listdir(out / "shards")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(_wds_keys(out)) == ["0", "1", "2", "3", "4", "5"]
    records = {json.loads(x)["id"]: json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()}
    assert records["4"]["shard"] == "train-000002.tar"
    assert json.loads((out / "shards.json").read_text())["samples"] == 6
    assert _wds_keys(b) == ["4", "5"]  # inputs untouched


def test_webdataset_keep_first_drops_the_other_inputs_sample_from_its_tar(tmp_path, capsys):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _wds_run(a, ["0", "1"])
    _wds_run(b, ["1", "2"], prompt="other ")
    with pytest.raises(SystemExit) as info:  # refused by default
        merge_main([str(a), str(b), "--out", str(out)])
    assert info.value.code == 2 and not out.exists()
    assert merge_main([str(a), str(b), "--out", str(out), "--on-conflict", "keep-first"]) == 0
    assert sorted(_wds_keys(out)) == ["0", "1", "2"]
    assert _wds_keys(b) == ["1", "2"]


def test_webdataset_record_whose_tar_lacks_it_is_incomplete(tmp_path, capsys):
    _wds_run(tmp_path, ["0", "1"])
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write(json.dumps({"id": "7", "index": 7, "shard": "train-000000.tar"}) + "\n")
    assert merge_main([str(tmp_path)]) == 1
    assert "incomplete 7 (manifest record without its sample in the tar it names)" in capsys.readouterr().out


def test_merge_refuses_mixed_layouts(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _wds_run(a, ["0"])
    (b / "SegmentationClass").mkdir(parents=True)
    (b / "manifest.jsonl").write_text("")
    with pytest.raises(SystemExit) as info:
        merge_main([str(a), str(b), "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert "mix voc and webdataset datasets" in capsys.readouterr().err
