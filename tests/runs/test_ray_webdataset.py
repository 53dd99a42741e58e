"""Ray workers writing tar shards: disjoint tars, a dead worker's uncommitted tail cut off, every id once.

A stand-in step (planted samples, no model) writes through the real :class:`ShardWriter`;
the driver's store is the real :class:`ShardStore`. One worker dies (``os._exit``) after its
batch's members are in its tar but before the batch returns: Ray restarts it, the batch is
redone elsewhere, and the run's end repairs the dead worker's tar.
"""
import functools
import json
import os
import tarfile

import pytest

from pccfast.core.labelset import as_label_set
from pccfast.data.prompts import PromptEntry
from pccfast.data.shards import ShardStore, ShardWriter
from pccfast.runs.engine import Prepared
from pccfast.testing.planted_datasets import planted_sample

VOC = as_label_set("voc")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason='Ray is optional: pip install "pccfast[ray]" to run the Ray tests')
    if ray.is_initialized():
        ray.shutdown()
    # the stand-in step lives in this test module: the workers import it from here
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


class ShardStep:
    """Planted samples into tar shards; the first worker to write id ``die_at`` dies right after
    its batch's tar is complete, before returning the batch (its records are never committed)."""

    name = "shards"

    def __init__(self, out, die_at, device="cpu"):
        self.out, self.die_at = out, die_at
        self.writer = ShardWriter(out, VOC, shard_size=3)

    def prepare(self, entries):
        return Prepared(list(entries))

    def process(self, prepared):
        return [planted_sample(e.index, 16)[:2] for e in prepared.items]

    def write(self, prepared, made):
        records = [self.writer.write_files(e.id, image, mask, record=dict(id=e.id, index=e.index, prompt=e.prompt))
                   for e, (image, mask) in zip(prepared.items, made)]
        self.writer.end_batch()
        if any(e.index == self.die_at for e in prepared.items):
            try:
                os.close(os.open(os.path.join(os.path.dirname(self.out), "died"), os.O_CREAT | os.O_EXCL))
                os._exit(1)
            except FileExistsError:
                pass
        return records, []


def test_ray_workers_write_disjoint_tars_and_a_dead_workers_tail_is_cut(ray, tmp_path):
    from pccfast.runs.ray import run_ray

    out = str(tmp_path / "out")
    entries = [PromptEntry(id=f"{i}", prompt=f"p{i}", classes=("cat",), index=i, source="test") for i in range(20)]
    report = run_ray(functools.partial(ShardStep, out, 7), entries, ShardStore(out, VOC), batch=2, workers=2,
                     progress=False)
    assert (tmp_path / "died").exists() and report.restarts >= 1
    assert sorted(report.written, key=int) == [e.id for e in entries] and report.failures == []
    keys = {}
    for name in sorted(os.listdir(tmp_path / "out" / "shards")):
        with tarfile.open(tmp_path / "out" / "shards" / name) as t:  # every tar read to its end
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    keys.setdefault(m.name.split(".")[0], []).append(name)
    assert sorted(keys, key=int) == [e.id for e in entries]
    assert all(len(names) == 1 for names in keys.values()), keys  # the dead worker's copy is gone
    records = {}
    for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["id"]] = r
    assert {sid: r["shard"] for sid, r in records.items()} == {k: v[0] for k, v in keys.items()}
    assert json.loads((tmp_path / "out" / "shards.json").read_text())["samples"] == 20
