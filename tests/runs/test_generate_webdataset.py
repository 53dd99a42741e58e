"""``generate --format webdataset``: the same bytes as the VOC layout, and kill -9 at several points, then resume."""
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from pccfast.cli.generate import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--no-progress"]

# runs generate in a child process that SIGKILLs itself at the N-th time it reaches POINT:
# member (halfway through writing a sample's members), close (halfway through a full shard's
# end marker), commit (before a manifest line), batch-end (the tar complete, nothing committed)
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pccfast.data import shards

    point, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    seen = [0]

    def due():
        seen[0] += 1
        return seen[0] == n

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    W, S = shards.ShardWriter, shards.ShardStore
    real = {"member": W._append, "close": W._close_shard, "commit": S.commit, "batch-end": W.end_batch}[point]
    if point == "member":
        def hook(self, data):
            if due():
                self._file.seek(self._end); self._file.write(data[: len(data) // 2]); self._file.flush(); die()
            return real(self, data)
        W._append = hook
    elif point == "close":
        def hook(self):
            if due():
                self._file.seek(self._end); self._file.write(shards.END_OF_ARCHIVE[:512]); self._file.flush(); die()
            return real(self)
        W._close_shard = hook
    elif point == "commit":
        def hook(self, record):
            if due():
                die()
            return real(self, record)
        S.commit = hook
    else:
        def hook(self):
            real(self)
            if due():
                die()
        W.end_batch = hook

    from pccfast.cli.generate import main
    sys.exit(main(argv))
""")


def _tars(out):
    """name -> keys of its samples, every tar read to its end by tarfile."""
    found = {}
    for name in sorted(os.listdir(out / "shards")):
        with tarfile.open(out / "shards" / name) as t:
            found[name] = [m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".json")]
    return found


def _check_dataset(out, ids):
    """Every tar valid (tarfile and the webdataset library read it to the end), every id in
    exactly one tar, one record per id naming that tar, the index agreeing."""
    tars = _tars(out)
    keys = [k for ks in tars.values() for k in ks]
    assert sorted(keys) == sorted(ids), tars
    where = {k: name for name, ks in tars.items() for k in ks}
    records = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["id"]] = r
    assert sorted(records) == sorted(ids)
    assert all(records[k]["shard"] == where[k] for k in ids)
    index = json.loads((out / "shards.json").read_text())
    assert index["samples"] == len(ids)
    assert {s["name"]: s["samples"] for s in index["shards"]} == {n: len(ks) for n, ks in tars.items()}
    wds = pytest.importorskip("webdataset")
    seen = []
    for s in wds.WebDataset(sorted(str(out / "shards" / n) for n in tars), shardshuffle=False):
        mask = Image.open(io.BytesIO(s["png"]))
        assert mask.mode == "P" and mask.size == (64, 64)
        assert set(np.unique(np.asarray(mask)).tolist()) <= set(range(21)) | {255}
        assert json.loads(s["json"])["id"] == s["__key__"]
        seen.append(s["__key__"])
    assert sorted(seen) == sorted(ids)
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]


def test_webdataset_holds_the_same_bytes_as_voc(tmp_path):
    """The same run as VOC files and as tar shards: identical JPEG and PNG bytes, same records."""
    voc, wds = tmp_path / "voc", tmp_path / "wds"
    args = ["--limit", "5", "--batch", "3", "--save-blocky", *TINY]
    assert main([*args, "--out", str(voc)]) == 0
    assert main([*args, "--out", str(wds), "--format", "webdataset", "--shard-size", "2"]) == 0
    tars = _tars(wds)
    assert [len(v) for v in tars.values()] == [2, 2, 1]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "shard")}  # noqa: E731
    voc_records = [strip(json.loads(x)) for x in (voc / "manifest.jsonl").read_text().splitlines()]
    assert [strip(json.loads(x)) for x in (wds / "manifest.jsonl").read_text().splitlines()] == voc_records
    for name in tars:
        with tarfile.open(wds / "shards" / name) as t:
            for m in t.getmembers():
                sid, ext = m.name.split(".", 1)
                data = t.extractfile(m).read()
                if ext == "json":
                    assert strip(json.loads(data)) == next(r for r in voc_records if r["id"] == sid)
                    continue
                folder = {"jpg": "JPEGImages", "png": "SegmentationClass", "blocky.png": "SegmentationClassBlocky"}[ext]
                assert data == (voc / folder / f"{sid}.{ext.split('.')[-1]}").read_bytes(), m.name
    # resume: nothing more to do, nothing rewritten
    before = {n: (wds / "shards" / n).read_bytes() for n in tars}
    assert main([*args, "--out", str(wds), "--format", "webdataset", "--shard-size", "2"]) == 0
    assert {n: (wds / "shards" / n).read_bytes() for n in _tars(wds)} == before


@pytest.mark.slow
def test_kill_9_at_four_points_then_resume(tmp_path):
    """kill -9 halfway through a sample's members, while a full shard closes, between two
    manifest lines of a batch, and after a batch's tar is complete but before its commit; each
    time the next run repairs the tars and resumes; the end: every tar valid, every id once."""
    out = tmp_path / "wds"
    args = ["--limit", "12", "--batch", "4", "--format", "webdataset", "--shard-size", "5", "--out", str(out), *TINY]
    ids = [str(i) for i in range(12)]
    threads = str(torch.get_num_threads())
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    # (point, which time, ids committed when killed): batch 2's second sample (shard 0 just
    # filled by its first); run 2's first full shard (id 8, batch 8..11); batch 8..11 after 2
    # of its 4 lines; batch 10..11 once its tar is complete (left: a whole uncommitted batch)
    for point, n, committed in (("member", 6, 4), ("close", 1, 8), ("commit", 3, 10), ("batch-end", 1, 10)):
        res = subprocess.run([sys.executable, "-c", KILLER, point, str(n), *args], env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == -9, f"{point}: the run was not killed there ({res.returncode}): {res.stderr[-1500:]}"
        lines = [json.loads(x)["id"] for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert lines == ids[:committed], point
    assert main(args) == 0  # resume
    _check_dataset(out, ids)
    assert sorted(os.listdir(out / "shards")) == [f"train-00000{i}.tar" for i in range(len(os.listdir(out / "shards")))]


def test_sharded_runs_write_disjoint_tars_and_merge_rebuilds_the_index(tmp_path, tiny_pipe):
    """--shard 0/2 and 1/2 into one folder (their own tar prefixes, no index yet); merge
    writes manifest.jsonl and shards.json holding every id once."""
    from pccfast.cli.merge import main as merge_main
    from pccfast.core.config import PCCConfig
    from pccfast.core.labelset import as_label_set
    from pccfast.data.prompt_bank import builtin_prompts
    from pccfast.diffusion.settings import GenerationConfig
    from pccfast.runs.generate import run_generation
    from pccfast.runs.plan import select_shard

    voc = as_label_set("voc")
    entries = builtin_prompts(voc)[:6]
    settings = GenerationConfig(model="tiny", steps=2, height=64, width=64)
    out = tmp_path / "shared"
    for shard in ((0, 2), (1, 2)):
        report = run_generation(select_shard(entries, shard), settings, PCCConfig(), voc, str(out), batch=2,
                                shard=shard, progress=False, pipe=tiny_pipe, format="webdataset", shard_size=2)
        assert report.done == 3
    tars = _tars(out)
    assert sorted(tars) == ["train-shard-0-of-2-000000.tar", "train-shard-0-of-2-000001.tar",
                            "train-shard-1-of-2-000000.tar", "train-shard-1-of-2-000001.tar"]
    assert not (out / "shards.json").exists() and not (out / "manifest.jsonl").exists()
    assert merge_main([str(out), "--quiet"]) == 0
    _check_dataset(out, [e.id for e in entries])
