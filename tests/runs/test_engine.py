"""The run engine's contract in this process (pccfast.runs.engine.run_local), with stand-in steps."""
import os
import threading
import time

import numpy as np
import pytest

from pccfast.data.fileio import read_jsonl
from pccfast.data.labelsets import get_label_set
from pccfast.data.layout import sample_paths
from pccfast.data.manifest import Manifest
from pccfast.data.prompts import PromptEntry
from pccfast.data.writer import SampleWriter
from pccfast.runs.engine import Prepared, RunError, run_local

VOC = get_label_set("voc")


class Step:
    """Writes a deterministic sample per entry. ``process`` raises MemoryError (as an
    out-of-memory batch) for a batch of more than one holding 'big', RuntimeError for
    'poison' even alone, KeyboardInterrupt on call ``interrupt_at``, and a CUDA error for 'cuda'."""

    name = "test"

    def __init__(self, out, interrupt_at=None):
        self.writer = SampleWriter(out, VOC)
        self.calls, self.interrupt_at, self.closed = [], interrupt_at, False

    def prepare(self, entries):
        bad = [(e.id, f"{e.id}: unreadable input") for e in entries if "unreadable" in e.prompt]
        return Prepared([e for e in entries if "unreadable" not in e.prompt], None, bad)

    def process(self, prepared):
        self.calls.append([e.id for e in prepared.items])
        if self.interrupt_at is not None and len(self.calls) - 1 == self.interrupt_at:
            raise KeyboardInterrupt
        prompts = [e.prompt for e in prepared.items]
        if "cuda" in prompts:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if "poison" in prompts:
            raise RuntimeError("poisoned\nsecond line")
        if "big" in prompts and len(prompts) > 1:
            raise MemoryError("out of memory (pretend)")
        return [np.random.default_rng(e.index) for e in prepared.items]

    def write(self, prepared, rngs):
        records = []
        for e, rng in zip(prepared.items, rngs):
            self.writer.write_files(e.id, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                                    rng.integers(0, 21, (8, 8), dtype=np.uint8))
            records.append(dict(id=e.id, index=e.index))
        return records, []

    def close(self):
        self.closed = True


def _entries(prompts):
    return [PromptEntry(id=f"{i:03d}", prompt=p, classes=("cat",), index=i, source="t") for i, p in enumerate(prompts)]


def _run(out, entries, step=None, **kw):
    step = step or Step(str(out))
    report = run_local(lambda device: step, entries, Manifest(str(out), VOC), batch=kw.pop("batch", 3),
                       progress=False, **kw)
    return report, step


def _engine_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("pccfast-")]


@pytest.mark.parametrize("io_threads", [0, 1])
def test_failed_batch_retried_item_by_item(tmp_path, io_threads, capsys):
    """An out-of-memory batch still yields its good items; an item that fails alone is one line."""
    entries = _entries(["a", "big", "c", "d", "poison", "f", "unreadable"])
    report, step = _run(tmp_path / "o", entries, io_threads=io_threads)
    assert step.calls == [["000", "001", "002"], ["000"], ["001"], ["002"], ["003", "004", "005"], ["003"], ["004"],
                          ["005"]]
    assert sorted(report.written) == ["000", "001", "002", "003", "005"]
    assert report.failures == [("004", "004: RuntimeError: poisoned"), ("006", "006: unreadable input")]
    assert report.retried == 2 and step.closed
    err = capsys.readouterr().err.splitlines()
    assert [x for x in err if x.startswith("error: ")] == ["error: 004: RuntimeError: poisoned",
                                                            "error: 006: unreadable input"]
    ids = [r["id"] for r in read_jsonl(str(tmp_path / "o" / "manifest.jsonl"))]
    assert sorted(ids) == sorted(report.written) and len(set(ids)) == len(ids)  # each committed once
    assert (tmp_path / "o" / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == sorted(ids)
    assert not _engine_threads()


def test_in_line_and_threaded_write_the_same(tmp_path):
    entries = _entries([f"p{i}" for i in range(10)])
    runs = []
    for io_threads in (0, 1):
        out = tmp_path / f"o{io_threads}"
        report, _ = _run(out, entries, io_threads=io_threads)
        files = {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
                 for d, _, fs in os.walk(out) for f in fs if f != "manifest.jsonl"}
        runs.append((report.written, report.failures, files))
    assert runs[0] == runs[1] and len(runs[0][0]) == 10


@pytest.mark.parametrize("io_threads", [0, 1])
def test_interrupt_commits_what_was_written_and_resumes(tmp_path, io_threads):
    """Ctrl-C in the third batch: the two batches before are written and committed, the
    KeyboardInterrupt reaches the caller, no thread or temporary file is left; the rerun does the rest."""
    out = tmp_path / "o"
    entries = _entries([f"p{i}" for i in range(9)])
    with pytest.raises(KeyboardInterrupt):
        _run(out, entries, step=Step(str(out), interrupt_at=2), io_threads=io_threads)
    assert not _engine_threads()
    ids = sorted(r["id"] for r in read_jsonl(str(out / "manifest.jsonl")))
    assert ids == [e.id for e in entries[:6]]
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]
    report, step = _run(out, entries, io_threads=io_threads)
    assert report.skipped == ids and report.written == ["006", "007", "008"] and step.calls == [["006", "007", "008"]]


def test_nothing_to_do_builds_no_step_and_build_errors_are_one_line(tmp_path):
    entries = _entries(["a", "b"])
    _run(tmp_path / "o", entries)

    def never(device):
        raise AssertionError("built a step with nothing to do")

    report = run_local(never, entries, Manifest(str(tmp_path / "o"), VOC), batch=2, progress=False)
    assert report.skipped == ["000", "001"] and report.written == []

    def broken(device):
        raise OSError("no such model: /x\nTraceback ...")

    with pytest.raises(RunError, match=r"^no such model: /x$"):
        run_local(broken, entries, Manifest(str(tmp_path / "p"), VOC), batch=2, progress=False)


def test_fatal_device_error_stops_the_run(tmp_path):
    """A CUDA error leaves the device unusable: no retry in this process, one line, finished work kept."""
    entries = _entries(["a", "b", "c", "cuda", "e"])
    with pytest.raises(RunError, match="CUDA error.*run the same command again to resume"):
        _run(tmp_path / "o", entries, io_threads=0)
    assert sorted(r["id"] for r in read_jsonl(str(tmp_path / "o" / "manifest.jsonl"))) == ["000", "001", "002"]
    assert os.path.exists(sample_paths(str(tmp_path / "o"), "002")["mask"])


def test_a_written_batch_is_committed_while_the_next_is_processed(tmp_path):
    """Regression: with the writer thread, a batch's manifest lines waited for the next batch's
    processing to end, so a kill -9 then lost two batches instead of the one in flight."""
    out = tmp_path / "o"
    seen = []

    class Watching(Step):
        def process(self, prepared):
            if len(self.calls) == 1:  # the second batch: the first one's lines appear meanwhile
                deadline = time.time() + 10
                while time.time() < deadline and len(read_jsonl(str(out / "manifest.jsonl"))) < 3:
                    time.sleep(0.01)
                seen.append(len(read_jsonl(str(out / "manifest.jsonl"))))
            return super().process(prepared)

    report, _ = _run(out, _entries([f"p{i}" for i in range(6)]), step=Watching(str(out)), io_threads=1)
    assert seen == [3] and len(report.written) == 6


class Finishing(Step):
    """A step with a ``finish`` stage (as generate's labeller): ``process`` hands over the
    rngs, ``finish`` fails like ``process`` does for 'fbig' (in a batch) and 'fpoison' and
    'fcuda', and logs which thread ran it and when."""

    def __init__(self, out, **kw):
        super().__init__(out, **kw)
        self.log, self.lock = [], threading.Lock()

    def process(self, prepared):
        with self.lock:
            self.log.append(("process", prepared.items[0].id, time.perf_counter(), threading.current_thread().name))
        return super().process(prepared)

    def finish(self, prepared, rngs):
        prompts = [e.prompt for e in prepared.items]
        with self.lock:
            self.log.append(("finish", prepared.items[0].id, time.perf_counter(), threading.current_thread().name))
        if "fcuda" in prompts:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if "fpoison" in prompts:
            raise RuntimeError("poisoned in finish")
        if "fbig" in prompts and len(prompts) > 1:
            raise MemoryError("out of memory in finish (pretend)")
        time.sleep(0.05)  # long enough for the next batch's process to start meanwhile
        with self.lock:
            self.log.append(("finished", prepared.items[0].id, time.perf_counter(), threading.current_thread().name))
        return rngs


@pytest.mark.parametrize("io_threads", [0, 1])
def test_finish_runs_for_every_batch_and_writes_the_same(tmp_path, io_threads):
    out = tmp_path / f"o{io_threads}"
    entries = _entries([f"p{i}" for i in range(7)])
    report, step = _run(out, entries, step=Finishing(str(out)), io_threads=io_threads)
    assert sorted(report.written) == [e.id for e in entries] and not report.failures
    assert [x[1] for x in step.log if x[0] == "finish"] == ["000", "003", "006"]
    ref = tmp_path / "plain"
    _run(ref, entries, io_threads=0)
    for e in entries:
        for kind in ("image", "mask"):
            with open(sample_paths(str(out), e.id)[kind], "rb") as a, open(sample_paths(str(ref), e.id)[kind], "rb") as b:
                assert a.read() == b.read()


def test_finish_overlaps_the_next_batch_process(tmp_path):
    """With the writer thread, batch i's finish (the labeller) runs while batch i+1 is processed
    (diffused), on another thread; in line, it ends before the next process starts."""
    entries = _entries([f"p{i}" for i in range(6)])
    _, threaded = _run(tmp_path / "t", entries, step=Finishing(str(tmp_path / "t")), io_threads=1)
    ev = {(kind, sid): (t, name) for kind, sid, t, name in threaded.log}
    assert ev[("finish", "000")][1] != ev[("process", "003")][1]
    assert ev[("process", "003")][0] < ev[("finished", "000")][0]  # batch 2 began before batch 1 was labelled
    _, inline = _run(tmp_path / "i", entries, step=Finishing(str(tmp_path / "i")), io_threads=0)
    ev = {(kind, sid): t for kind, sid, t, _ in inline.log}
    assert ev[("finished", "000")] < ev[("process", "003")]


@pytest.mark.parametrize("io_threads", [0, 1])
def test_a_batch_whose_finish_fails_is_retried_item_by_item(tmp_path, io_threads, capsys):
    out = tmp_path / "o"
    entries = _entries(["a", "fbig", "c", "d", "fpoison", "f", "g"])
    report, step = _run(out, entries, step=Finishing(str(out)), io_threads=io_threads)
    assert sorted(report.written) == ["000", "001", "002", "003", "005", "006"]
    assert report.failures == [("004", "004: RuntimeError: poisoned in finish")]
    assert report.retried == 2
    assert sorted(r["id"] for r in read_jsonl(str(out / "manifest.jsonl"))) == sorted(report.written)


@pytest.mark.parametrize("io_threads", [0, 1])
def test_a_fatal_device_error_in_finish_stops_the_run(tmp_path, io_threads):
    entries = _entries(["a", "b", "c", "fcuda", "e", "f", "g"])
    with pytest.raises(RunError, match="CUDA error.*run the same command again to resume"):
        _run(tmp_path / "o", entries, step=Finishing(str(tmp_path / "o")), io_threads=io_threads)
    done = {r["id"] for r in read_jsonl(str(tmp_path / "o" / "manifest.jsonl"))}
    # the batch before is kept, the failed one is not; with the writer thread a batch already
    # processed behind it may still be finished and committed (what finishes is whole)
    assert {"000", "001", "002"} <= done and not done & {"003", "004", "005"}
