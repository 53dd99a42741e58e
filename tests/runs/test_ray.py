"""The Ray backend (``generate --ray``) on a local Ray instance on this machine's CPUs.

One Ray instance is shared by the whole module (start-up takes seconds). The first tests use a
stand-in step (no model) to pin the scheduling: every batch committed exactly once, a
failing batch retried and then reported, a killed worker restarted and its batch redone. The
last ones run the real pipeline on the tiny model and compare with the single-process run.
"""
import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

import functools

from pccfast.core.config import PCCConfig
from pccfast.cli.generate import main as generate_main
from pccfast.data.fileio import read_jsonl
from pccfast.data.layout import sample_paths as dataset_paths
from pccfast.data.manifest import Manifest
from pccfast.data.writer import SampleWriter
from pccfast.runs.engine import Prepared
from pccfast.data.labelsets import get_label_set
from pccfast.data.prompts import PromptEntry

VOC = get_label_set("voc")
HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--batch", "2", "--no-progress"]


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason='Ray is optional: pip install "pccfast[ray]" to run the Ray tests')
    if ray.is_initialized():
        ray.shutdown()
    # the stand-in runners below live in this test module: the workers import it from here
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


class FakeStep:
    """Stands in for the generate step: a deterministic image/mask per entry; a batch holding a
    'poison' prompt raises in ``process``."""

    name = "fake"

    def __init__(self, out, device="cpu"):
        self.writer = SampleWriter(out, VOC)
        self.calls = os.path.join(os.path.dirname(out), "calls")
        os.makedirs(self.calls, exist_ok=True)

    def prepare(self, entries):
        return Prepared(list(entries))

    def process(self, prepared):
        with open(os.path.join(self.calls, f"{os.getpid()}-{time.time_ns()}"), "w") as f:
            f.write(" ".join(e.id for e in prepared.items))
        for e in prepared.items:
            if "poison" in e.prompt:
                raise RuntimeError(f"poisoned prompt {e.id}")
        time.sleep(0.05 * len(prepared.items))
        return [np.random.default_rng(e.index) for e in prepared.items]

    def write(self, prepared, rngs):
        records = []
        for e, rng in zip(prepared.items, rngs):
            self.writer.write_files(e.id, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                                    rng.integers(0, 21, (16, 16), dtype=np.uint8))
            records.append(dict(id=e.id, index=e.index, prompt=e.prompt, classes=list(e.classes), pid=os.getpid()))
        return records, []


class CudaErrorOnceStep(FakeStep):
    """The first batch of the run hits a (simulated) CUDA error, which leaves a process unusable."""

    def process(self, prepared):
        marker = os.path.join(os.path.dirname(self.writer.out), "cuda-error-raised")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().process(prepared)
        os.close(fd)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


class UnevenStep(FakeStep):
    """The first worker to start is fast, the second slow (a fast and a slow GPU)."""

    def __init__(self, out, device="cpu"):
        super().__init__(out, device)
        try:
            os.close(os.open(os.path.join(os.path.dirname(out), "fast"), os.O_CREAT | os.O_EXCL))
            self.extra = 0.0
        except FileExistsError:
            self.extra = 1.0  # slow enough that a late-starting fast worker still overtakes it under load

    def process(self, prepared):
        time.sleep(self.extra)
        return super().process(prepared)


def _entries(n, poison=()):
    return [PromptEntry(id=f"{i:04d}", prompt="poison" if i in poison else f"a cat {i}", classes=("cat",), index=i,
                        source="test") for i in range(n)]


def _run_fake(tmp_path, entries, step=FakeStep, **kw):
    from pccfast.runs.ray import run_ray

    out = str(tmp_path / "out")
    report = run_ray(functools.partial(step, out), entries, Manifest(out, VOC), batch=2, workers=2, progress=False, **kw)
    return report, tmp_path / "out"


def _temp_files(out):
    return [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]


def _split(out):
    return (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


def _worker_pids(busy=False):
    """PIDs of pccfast Ray actors: Ray titles an actor's process ``ray::_Worker``, and
    ``ray::_Worker.run`` while it runs a batch (``busy``)."""
    prefix = b"ray::_Worker.run" if busy else b"ray::_Worker"
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(prefix):
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


# --- without Ray --------------------------------------------------------------------------
def test_without_ray_one_line_message(monkeypatch, tmp_path, capsys):
    import pccfast.runs.ray as distributed

    monkeypatch.setattr(distributed, "ray_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        generate_main(["--limit", "2", "--out", str(tmp_path), "--ray", "--model", "tiny"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: the Ray backend (--ray) needs Ray: pip install "pccfast[ray]" (or pip install "ray>=2.9")']


def test_resolve_workers():
    from pccfast.runs.ray import resolve_workers

    assert resolve_workers(None, "cpu", {"CPU": 8.0}, [8.0]) == (1, dict(num_cpus=8.0, num_gpus=0))
    assert resolve_workers(3, "cpu", {"CPU": 2.0}, [2.0]) == (3, dict(num_cpus=0.666, num_gpus=0))
    assert resolve_workers(4, "cpu", {"CPU": 64.0}, [32.0, 32.0]) == (4, dict(num_cpus=16.0, num_gpus=0))
    assert resolve_workers(None, "cuda", {"CPU": 16.0, "GPU": 4.0}, [16.0]) == (4, dict(num_cpus=1.0, num_gpus=1.0))
    assert resolve_workers(3, "cuda:1", {"CPU": 16.0, "GPU": 2.0}, [16.0]) == (3, dict(num_cpus=1.0, num_gpus=0.5))
    with pytest.raises(ValueError, match="`device` is 'cuda' but the Ray cluster has no GPU"):
        resolve_workers(None, "cuda", {"CPU": 4.0}, [4.0])
    assert resolve_workers(2, "cpu", {"CPU": 2.0}, [2.0], cpus_per_worker=0.5) == (2, dict(num_cpus=0.5, num_gpus=0))
    with pytest.raises(ValueError, match="`cpus_per_worker` has to be positive but is 0"):
        resolve_workers(2, "cpu", {"CPU": 2.0}, [2.0], cpus_per_worker=0)
    with pytest.raises(ValueError, match="`workers` has to be at least 1 but is 0"):
        resolve_workers(0, "cpu", {"CPU": 4.0}, [4.0])


# --- scheduling with a stand-in runner ------------------------------------------------------
def test_every_batch_once_failing_batch_retried_item_by_item_cuda_error_restarts(ray, tmp_path):
    """Every item committed once; the poisoned batch is run again item by item, so its good item is
    written and only the poisoned one reported; the (simulated) CUDA error ends its worker's process,
    which Ray restarts, and the batch is redone."""
    from pccfast.runs.engine import fatal_device_error

    assert fatal_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not fatal_device_error(RuntimeError("shape mismatch"))
    entries = _entries(20, poison={13})
    report, out = _run_fake(tmp_path, entries, step=CudaErrorOnceStep)
    assert report.workers == 2 and report.restarts == 1
    assert report.failures == [("0013", "0013: RuntimeError: poisoned prompt 0013")]
    records = read_jsonl(str(out / "manifest.jsonl"))
    ids = [r["id"] for r in records]
    expected = [f"{i:04d}" for i in range(20) if i != 13]
    assert sorted(ids) == expected and len(ids) == len(set(ids))  # committed exactly once
    assert _split(out) == expected  # train.txt in prompt order, not completion order
    calls = [open(os.path.join(tmp_path, "calls", c)).read() for c in os.listdir(tmp_path / "calls")]
    assert calls.count("0012 0013") == 1 and calls.count("0012") == 1 and calls.count("0013") == 1  # once, then alone
    assert len(calls) == 10 + 2  # (+ the call that hit the CUDA error, which ended before logging)
    assert report.done == 19 and report.retried >= 1  # the batch of the dead worker was handed out again
    # a second run resumes from the manifest: nothing to do for the finished ids, no actor started
    report2, _ = _run_fake(tmp_path, [e for e in entries if e.id in expected])
    assert len(report2.skipped) == 19 and report2.done == 0 and report2.workers == 0


def test_fast_worker_takes_more_batches(ray, tmp_path):
    """Dynamic load balancing: batches go to whichever worker is free, not round-robin."""
    report, out = _run_fake(tmp_path, _entries(32), step=UnevenStep)
    per_pid = {}
    for r in read_jsonl(str(out / "manifest.jsonl")):
        per_pid[r["pid"]] = per_pid.get(r["pid"], 0) + 1
    assert report.done == 32 and len(per_pid) == 2
    assert max(per_pid.values()) >= 2 * min(per_pid.values()), per_pid


def test_killed_worker_is_restarted_and_its_batch_redone(ray, tmp_path):
    entries = _entries(40)
    man = tmp_path / "out" / "manifest.jsonl"
    killed = []

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline and len(read_jsonl(str(man))) < 6:
            time.sleep(0.02)
        pid = read_jsonl(str(man))[-1]["pid"]  # a worker that is busy with its next batch
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    report, out = _run_fake(tmp_path, entries)
    thread.join()
    assert killed, "the run ended before a worker could be killed"
    assert report.failures == [] and report.restarts >= 1
    records = read_jsonl(str(out / "manifest.jsonl"))
    ids = [r["id"] for r in records]
    assert sorted(ids) == [e.id for e in entries] and len(ids) == len(set(ids))
    assert _split(out) == [e.id for e in entries]
    assert _temp_files(out) == []
    pids = {r["pid"] for r in records}
    assert len(pids) >= 2 and killed[0] in pids  # the killed worker had committed work before
    for e in entries:
        with Image.open(dataset_paths(str(out), e.id)["image"]) as im:
            im.verify()


# --- the real pipeline on the tiny model ----------------------------------------------------
@pytest.fixture(scope="module")
def single_process(tmp_path_factory, shared_prompts):
    out = tmp_path_factory.mktemp("single")
    argv = ["--prompts", shared_prompts, "--limit", "16", "--out", str(out), *TINY, "--batch", "4"]  # last wins
    assert generate_main(argv) == 0  # one torch thread (conftest), as each Ray worker here
    return out


def _compare(out, ref, n):
    """Same ids (the first ``n`` of ``ref``), manifests, images within JPEG noise, masks >= 99.9% equal."""
    ids = _split(ref)[:n]
    assert _split(out) == ids and len(ids) == n
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(sorted(read_jsonl(str(out / "manifest.jsonl")), key=lambda r: r["index"])) == \
        strip(read_jsonl(str(ref / "manifest.jsonl")))[:n]
    same = total = 0
    for i in ids:
        a, b = (np.asarray(Image.open(dataset_paths(str(d), i)["mask"])) for d in (out, ref))
        same, total = same + int((a == b).sum()), total + a.size
        a, b = (np.asarray(Image.open(dataset_paths(str(d), i)["image"]), dtype=np.int16) for d in (out, ref))
        assert np.abs(a - b).mean() < 0.5, i
    assert same / total >= 0.999
    assert _temp_files(out) == []


@pytest.mark.slow
def test_ray_two_workers_equal_single_process(ray, single_process, shared_prompts, tmp_path):
    out = tmp_path / "ray"
    argv = ["--prompts", shared_prompts, "--limit", "16", "--out", str(out), "--ray", "--workers", "2", *TINY]
    assert generate_main(argv) == 0
    _compare(out, single_process, 16)


@pytest.mark.slow
def test_ray_worker_killed_mid_run(ray, single_process, shared_prompts, tmp_path, capsys):
    """SIGKILL to a worker busy with a batch: Ray restarts it, its batches go to the other, all 8 ids valid."""
    out = tmp_path / "killed"
    man = out / "manifest.jsonl"
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not read_jsonl(str(man)):
            time.sleep(0.02)
        busy = _worker_pids(busy=True)
        if busy and len(read_jsonl(str(man))) < 8:
            os.kill(busy[0], signal.SIGKILL)
            killed.append(busy[0])

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    argv = ["--prompts", shared_prompts, "--limit", "8", "--out", str(out), "--ray", "--workers", "2", *TINY]
    assert generate_main(argv) == 0
    thread.join()
    assert killed, "the run ended before a worker could be killed"
    assert "died" in capsys.readouterr().err
    _compare(out, single_process, 8)


# --- relabel through the same engine ---------------------------------------------------------
class SlowRelabelStep:
    """The real relabel step, slowed down so that a worker can be killed while it is busy."""

    name = "relabel"

    def __init__(self, images_dir, out, device="cpu"):
        from pccfast.data.masks import MaskWriter
        from pccfast.runs.relabel import RelabelStep

        self.inner = RelabelStep(PCCConfig(), VOC, images_dir, MaskWriter(out, VOC), device=device, readers=0)

    def prepare(self, items):
        return self.inner.prepare(items)

    def process(self, prepared):
        time.sleep(0.3)
        return self.inner.process(prepared)

    def write(self, prepared, result):
        return self.inner.write(prepared, result)


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs}


def test_relabel_ray_two_workers_equal_one_process(ray, tmp_path):
    from pccfast.cli.relabel import main as relabel_main
    from pccfast.testing.fixtures import make_dataset

    captures, images, _ = make_dataset(str(tmp_path), n=6)
    base = ["--captures", captures, "--images", images, "--device", "cpu", "--no-progress", "--batch", "2"]
    assert relabel_main(base + ["--out", str(tmp_path / "one")]) == 0
    assert relabel_main(base + ["--out", str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 0
    one, two = _files(tmp_path / "one"), _files(tmp_path / "ray")
    assert one == two and len(one) == 6 + 1  # six masks and labelset.json, byte for byte


def test_relabel_worker_killed_loses_nothing(ray, tmp_path):
    """SIGKILL to a busy relabel worker: Ray restarts it, its batch is redone, every mask is
    there once, byte-equal to a run in this process, and no temporary file is left."""
    from pccfast.data.masks import MaskStore, find_inputs
    from pccfast.runs.ray import run_ray
    from pccfast.runs.relabel import relabel_dir
    from pccfast.testing.fixtures import make_dataset

    captures, images, _ = make_dataset(str(tmp_path), n=12)
    relabel_dir(captures, images, str(tmp_path / "one"), device="cpu", batch=2, workers=0)
    out = str(tmp_path / "killed")
    killed = []

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            busy = _worker_pids(busy=True)
            masks = os.path.join(out, "SegmentationClass")
            if busy and os.path.isdir(masks) and len(os.listdir(masks)) >= 2:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    report = run_ray(functools.partial(SlowRelabelStep, images, out), find_inputs(captures, images),
                     MaskStore(out, VOC), batch=2, workers=2, progress=False)
    thread.join()
    assert killed, "the run ended before a worker could be killed"
    assert report.failures == [] and report.restarts >= 1 and sorted(report.written) == sorted(set(report.written))
    assert len(report.written) == 12
    assert _files(out) == _files(tmp_path / "one")
    assert _temp_files(out) == []
