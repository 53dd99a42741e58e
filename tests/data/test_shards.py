"""WebDataset tar shards: writer, store, the repair after a crash, the index, the webdataset library."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pccfast.core.labelset import as_label_set
from pccfast.data.layout import TAR_INDEX
from pccfast.data.shards import (END_OF_ARCHIVE, ShardStore, ShardWriter, check_format, check_tar_id, group_samples,
                                 read_members, repair_tar, tar_member_bytes)
from pccfast.testing.planted_datasets import planted_sample

VOC = as_label_set("voc")


def _sample(i):
    image, mask, _ = planted_sample(i, 32)
    return image, mask


def _write_batch(store, writer, ids, commit=True):
    records = []
    for sid in ids:
        image, mask = _sample(int(sid))
        records.append(writer.write_files(sid, image, mask, record=dict(id=sid, index=int(sid), prompt=f"p{sid}")))
    writer.end_batch()
    if commit:
        for r in records:
            store.commit(r)
    return records


def _tar_keys(out):
    """key -> number of tars holding it, after reading every tar to its end with tarfile."""
    seen = {}
    for name in sorted(os.listdir(out / "shards")):
        with tarfile.open(out / "shards" / name) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    key = m.name.split(".")[0]
                    seen[key] = seen.get(key, 0) + 1
    return seen


def test_members_are_webdataset_samples(tmp_path):
    store = ShardStore(str(tmp_path), VOC)
    writer = ShardWriter(str(tmp_path), VOC, shard_size=3)
    _write_batch(store, writer, ["0", "1"])
    _write_batch(store, writer, ["2", "3", "4"])
    assert store.finalize() == ["0", "1", "2", "3", "4"]
    assert sorted(os.listdir(tmp_path / "shards")) == ["train-000000.tar", "train-000001.tar"]
    index = json.loads((tmp_path / TAR_INDEX).read_text())
    assert index["samples"] == 5
    assert [(s["name"], s["samples"]) for s in index["shards"]] == [("train-000000.tar", 3), ("train-000001.tar", 2)]
    assert all(s["bytes"] == os.path.getsize(tmp_path / "shards" / s["name"]) for s in index["shards"])
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as t:
        assert t.getnames() == ["0.jpg", "0.png", "0.json", "1.jpg", "1.png", "1.json", "2.jpg", "2.png", "2.json"]
        rec = json.loads(t.extractfile("2.json").read())
        assert rec == {"id": "2", "index": 2, "prompt": "p2"}  # the record, without where it is stored
        mask = np.asarray(Image.open(io.BytesIO(t.extractfile("2.png").read())))
    assert (mask == _sample(2)[1]).all()
    manifest = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["shard"] for r in manifest] == ["train-000000.tar"] * 3 + ["train-000001.tar"] * 2


def test_the_webdataset_library_reads_every_sample(tmp_path):
    wds = pytest.importorskip("webdataset")
    store = ShardStore(str(tmp_path), VOC)
    writer = ShardWriter(str(tmp_path), VOC, shard_size=4)
    ids = [str(i) for i in range(10)]
    for k in range(0, 10, 3):
        _write_batch(store, writer, ids[k:k + 3])
    store.finalize()
    urls = sorted(str(p) for p in (tmp_path / "shards").iterdir())
    found = {}
    for s in wds.WebDataset(urls, shardshuffle=False):
        found[s["__key__"]] = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert json.loads(s["json"])["id"] == s["__key__"]
    assert sorted(found) == sorted(ids)
    for sid in ids:
        assert (found[sid] == _sample(int(sid))[1]).all()


def test_an_open_tar_is_valid_after_every_batch(tmp_path):
    """The end marker is written (and fsync'ed) at each batch end, so the tar on disk is a
    complete archive at every commit point, before the shard is full."""
    store = ShardStore(str(tmp_path), VOC)
    writer = ShardWriter(str(tmp_path), VOC, shard_size=100)
    for batch in (["0", "1"], ["2"], ["3", "4"]):
        _write_batch(store, writer, batch)
        path = tmp_path / "shards" / "train-000000.tar"
        with tarfile.open(path) as t:
            assert [n.split(".")[0] for n in t.getnames()][-1] == batch[-1]
        assert path.read_bytes().endswith(END_OF_ARCHIVE)


def test_repair_cuts_back_an_uncommitted_and_torn_tail(tmp_path):
    """What kill -9 leaves: members written but not committed, then a torn member."""
    store = ShardStore(str(tmp_path), VOC)
    writer = ShardWriter(str(tmp_path), VOC, shard_size=100)
    _write_batch(store, writer, ["0", "1"])
    _write_batch(store, writer, ["2", "3"], commit=False)  # written, fsync'ed, never committed
    path = tmp_path / "shards" / "train-000000.tar"
    committed_size = None
    with open(path, "r+b") as f:  # a torn member in flight, over the end marker
        f.seek(0, os.SEEK_END)
        f.seek(f.tell() - len(END_OF_ARCHIVE))
        f.write(tar_member_bytes("4.jpg", b"x" * 3000)[:1500])
    again = ShardStore(str(tmp_path), VOC)  # resume
    assert again.done_ids() == {"0", "1"}
    assert [m.name for m in read_members(str(path))] == ["0.jpg", "0.png", "0.json", "1.jpg", "1.png", "1.json"]
    members = read_members(str(path))
    committed_size = members[-1].end + len(END_OF_ARCHIVE)
    assert os.path.getsize(path) == committed_size
    w2 = ShardWriter(str(tmp_path), VOC, shard_size=100)
    _write_batch(again, w2, ["2", "3", "4"])  # redone into a new tar
    assert again.finalize() == ["0", "1", "2", "3", "4"]
    assert _tar_keys(tmp_path) == {k: 1 for k in "01234"}


def test_repair_rewrites_a_tar_with_an_uncommitted_sample_between_committed_ones(tmp_path):
    """A dead Ray worker's batch can sit between committed ones: the tar is rewritten without it."""
    store = ShardStore(str(tmp_path), VOC)
    writer = ShardWriter(str(tmp_path), VOC, shard_size=100)
    _write_batch(store, writer, ["0"])
    _write_batch(store, writer, ["1"], commit=False)
    _write_batch(store, writer, ["2"])
    assert store.finalize() == ["0", "2"]
    assert _tar_keys(tmp_path) == {"0": 1, "2": 1}
    assert [k for k, _ in group_samples(read_members(str(tmp_path / "shards" / "train-000000.tar")))] == ["0", "2"]


def test_repair_keeps_one_copy_and_removes_tars_without_committed_samples(tmp_path):
    path = tmp_path / "a-000000.tar"
    data = b"".join(tar_member_bytes(f"{k}.json", b"{}") for k in ("a", "b", "a")) + END_OF_ARCHIVE
    path.write_bytes(data)
    assert repair_tar(str(path), {"a", "b"}) == ["b", "a"]  # the last copy of a, the one committed last
    with tarfile.open(path) as t:
        assert t.getnames() == ["b.json", "a.json"]
    assert repair_tar(str(path), set()) == [] and not path.exists()


def test_read_members_stops_at_a_torn_header_and_at_cut_data(tmp_path):
    path = tmp_path / "t.tar"
    whole = tar_member_bytes("a.jpg", b"1" * 700) + tar_member_bytes("b.jpg", b"2" * 700)
    for cut, names in ((len(whole), ["a.jpg", "b.jpg"]), (len(whole) - 10, ["a.jpg"]), (1024 + 1536 + 100, ["a.jpg"]),
                       (300, []), (0, [])):
        path.write_bytes(whole[:cut])
        assert [m.name for m in read_members(str(path))] == names, cut


def test_writers_take_disjoint_tar_names(tmp_path):
    """Two writers of one prefix (Ray workers) never share a tar; a resumed run starts a new one."""
    store = ShardStore(str(tmp_path), VOC)
    a, b = ShardWriter(str(tmp_path), VOC), ShardWriter(str(tmp_path), VOC)
    ra = _write_batch(store, a, ["0"])
    rb = _write_batch(store, b, ["1"])
    assert ra[0]["shard"] != rb[0]["shard"]
    s1 = ShardStore(str(tmp_path), VOC, shard=(1, 2))
    c = ShardWriter(str(tmp_path), VOC, prefix=s1.prefix)
    assert _write_batch(s1, c, ["3"])[0]["shard"] == "train-shard-1-of-2-000000.tar"
    s1.finalize()
    assert not (tmp_path / "manifests" / "shards.json").exists()
    assert store.finalize() == ["0", "1", "3"]  # another prefix's tars are left alone, their samples count


def test_writer_is_picklable_and_a_failed_sample_leaves_nothing(tmp_path, monkeypatch):
    import pickle

    store = ShardStore(str(tmp_path), VOC)
    writer = ShardWriter(str(tmp_path), VOC)
    _write_batch(store, writer, ["0"])
    copy = pickle.loads(pickle.dumps(writer))
    assert copy._file is None
    calls = []

    def fail_after_half(self, data):
        calls.append(1)
        self._file.seek(self._end)
        self._file.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardWriter, "_append", fail_after_half)
    image, mask = _sample(1)
    with pytest.raises(OSError):
        writer.write_files("1", image, mask, record={"id": "1"})
    monkeypatch.undo()
    writer.end_batch()
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as t:
        assert [n.split(".")[0] for n in t.getnames()] == ["0", "0", "0"]


def test_ids_with_a_dot_are_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match=r"needs ids without '\.'.*'a\.b'"):
        check_tar_id("a.b")
    store = ShardStore(str(tmp_path), VOC)
    with pytest.raises(ValueError, match="without '.'"):
        store.write_plan(["ok", "a.b"])
    with pytest.raises(ValueError, match="not a plain file name"):
        check_tar_id("../x")


def test_shard_size_and_format_are_checked(tmp_path):
    with pytest.raises(ValueError, match="`shard_size` has to be a positive int but is 0"):
        ShardWriter(str(tmp_path), VOC, shard_size=0)
    with pytest.raises(ValueError, match="`format` has to be one of voc, webdataset but is 'tar'"):
        check_format(str(tmp_path), "tar", ("voc", "webdataset"))
    (tmp_path / "SegmentationClass").mkdir()
    with pytest.raises(ValueError, match="holds a voc dataset, not webdataset"):
        check_format(str(tmp_path), "webdataset")
    check_format(str(tmp_path), "voc")


def test_long_ids_get_pax_headers_and_are_read_back(tmp_path):
    """Names over 100 bytes need a PAX header, which the direct header reader hands to tarfile."""
    from pccfast.data.shards import _read_members_tarfile

    store = ShardStore(str(tmp_path), VOC)
    writer = ShardWriter(str(tmp_path), VOC)
    long_id = "x" * 150
    _write_batch(store, writer, ["0"])
    image, mask = _sample(1)
    store.commit(writer.write_files(long_id, image, mask, record={"id": long_id}))
    writer.end_batch()
    path = str(tmp_path / "shards" / "train-000000.tar")
    members = read_members(path)
    assert [m.key for m in members] == ["0"] * 3 + [long_id] * 3
    assert members == _read_members_tarfile(path, os.path.getsize(path))
    assert store.finalize() == ["0", long_id]
    with tarfile.open(path) as t:
        assert t.getnames()[-1] == f"{long_id}.json"


def test_direct_header_reader_agrees_with_tarfile(tmp_path):
    from pccfast.data.shards import _read_members_tarfile

    store = ShardStore(str(tmp_path), VOC)
    writer = ShardWriter(str(tmp_path), VOC)
    _write_batch(store, writer, [str(i) for i in range(6)])
    path = str(tmp_path / "shards" / "train-000000.tar")
    assert read_members(path) == _read_members_tarfile(path, os.path.getsize(path))
    assert len(read_members(path)) == 18


def test_tars_verified_by_the_index_are_not_read_again(tmp_path, monkeypatch):
    """A finished run's index marks its tars verified; the next run trusts them while their
    count and size are unchanged, and reads (and repairs) one that changed."""
    from pccfast.data import shards

    store = ShardStore(str(tmp_path), VOC)
    writer = ShardWriter(str(tmp_path), VOC, shard_size=2)
    _write_batch(store, writer, ["0", "1", "2"])
    store.finalize()
    index = json.loads((tmp_path / TAR_INDEX).read_text())
    assert [s["verified"] for s in index["shards"]] == [True, True]
    read = []
    real = shards.read_members
    monkeypatch.setattr(shards, "read_members", lambda path: read.append(os.path.basename(path)) or real(path))
    assert ShardStore(str(tmp_path), VOC).done_ids() == {"0", "1", "2"}
    assert read == []
    with open(tmp_path / "shards" / "train-000001.tar", "ab") as f:  # a changed tar (should not happen)
        f.write(tar_member_bytes("9.jpg", b"x"))
    again = ShardStore(str(tmp_path), VOC)
    assert read == ["train-000001.tar"] and again.done_ids() == {"0", "1", "2"}
    with tarfile.open(tmp_path / "shards" / "train-000001.tar") as t:
        assert t.getnames() == ["2.jpg", "2.png", "2.json"]
    again.finalize()
    assert all(s["verified"] for s in json.loads((tmp_path / TAR_INDEX).read_text())["shards"])


def test_repair_never_changes_a_hard_linked_tar_in_place(tmp_path):
    """merge links tars into its --out: cutting the source's tar must leave the link's content."""
    path, link = tmp_path / "a-000000.tar", tmp_path / "b-000000.tar"
    path.write_bytes(tar_member_bytes("a.json", b"{}") + tar_member_bytes("b.json", b"{}") + END_OF_ARCHIVE)
    os.link(path, link)
    assert repair_tar(str(path), {"a"}) == ["a"]
    with tarfile.open(link) as t:
        assert t.getnames() == ["a.json", "b.json"]
    with tarfile.open(path) as t:
        assert t.getnames() == ["a.json"]
