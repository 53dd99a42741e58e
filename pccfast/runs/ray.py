"""Ray backend of ``python -m pccfast.generate --ray [ADDRESS]``: many GPUs, many machines.

Each worker is a Ray actor that loads the pipeline once onto its own device (one GPU per
actor; on a CPU-only cluster a share of the CPUs) and runs batches of prompts through
:class:`pccfast.generate.BatchRunner`, which writes every file of a sample atomically
straight into the output directory. The driver owns the manifest and the progress bar:

* **dynamic load balancing** -- each live actor holds at most ``inflight`` batches (default
  2, so it never waits for the driver); the next batch goes to whichever actor finishes
  first (``ray.wait``), so a fast GPU takes more batches than a slow one;
* **commit point** -- a batch's manifest lines are appended by the driver only after the
  actor has returned, i.e. after all its files exist; a record is never committed twice;
* **faults** -- an actor that dies (killed process, lost node, CUDA error) is restarted by
  Ray (``max_restarts``); the batch it was running is charged one attempt and, with the
  batches queued behind it, handed back to the queue for the next free worker. The files a
  dead actor may have written for such a batch are rewritten atomically (same seeds, same
  content) and its temporary files are removed. A batch that failed ``max_attempts`` times
  (default 3) is reported and skipped;
* **resume** -- stopping the driver and re-running the command skips every id whose
  manifest record exists, exactly as in the single-process path.

Ray is optional (``pip install "pccfast[ray]"``); it is imported only inside
:func:`run_ray`. On a multi-node cluster the output directory must be on a file system that
every node sees at the same path, and pccfast must be installed on every node.
"""
from __future__ import annotations

import glob
import importlib.util
import math
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from pccfast.core.config import PCCConfig
from pccfast.data.dataset import DatasetWriter, dataset_paths
from pccfast.runs.generate import BatchRunner, GenerationConfig, GenerationReport, batches, pending
from pccfast.core.labelset import LabelSet

__all__ = ["RayReport", "RayRunError", "ray_available", "run_ray", "resolve_workers"]

MAX_ATTEMPTS = 3  # a batch that fails this often is reported and skipped
INSTALL_HINT = 'the Ray backend (--ray) needs Ray: pip install "pccfast[ray]" (or pip install "ray>=2.9")'


class RayRunError(RuntimeError):
    """The Ray run could not go on (e.g. no worker could load the pipeline)."""


@dataclass
class BatchStat:
    """Timings of one finished batch (seconds; ``transfer`` = actor return -> driver receipt)."""

    size: int  # samples in the batch
    run: float  # whole BatchRunner.run inside the actor
    write: float  # of which writing files (JPEG/PNG encoding, capture files, fsync)
    transfer: float  # result travelling back to the driver, plus the driver noticing it
    worker: int  # actor slot


@dataclass
class RayReport(GenerationReport):
    """GenerationReport plus what the Ray run cost (for logs and ``benchmarks/bench_scaleout.py``)."""

    workers: int = 0  # actors started
    restarts: int = 0  # actor deaths seen (each followed by a restart, while Ray allows one)
    retried: int = 0  # batches handed out again after a failure
    connect_seconds: float = 0.0  # ray.init (start or join)
    startup_seconds: float = 0.0  # actors created -> first actor ready (process start + model load)
    load_seconds: list = field(default_factory=list)  # per actor start: pipeline load inside the actor
    batch_stats: list = field(default_factory=list)  # BatchStat per finished batch


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def _import_ray():
    if not ray_available():
        raise ImportError(INSTALL_HINT)
    import ray

    return ray


# ------------------------------------------------------------------------------------------
# the worker (plain class; wrapped with ray.remote inside run_ray so that importing this
# module never needs Ray)
# ------------------------------------------------------------------------------------------
class _TimedWriter(DatasetWriter):
    """A worker's writer: writes files like DatasetWriter, times it, and never commits."""

    write_seconds: float = 0.0

    def write_files(self, *args, **kwargs) -> None:
        t0 = time.perf_counter()
        try:
            super().write_files(*args, **kwargs)
        finally:
            self.write_seconds += time.perf_counter() - t0

    def commit(self, record: dict) -> None:
        raise RuntimeError("a Ray worker does not commit manifest records; the driver does")


def _fatal_device_error(exc: BaseException) -> bool:
    """CUDA errors leave the context unusable: the process has to go and be restarted."""
    text = str(exc)
    return type(exc).__name__ == "AcceleratorError" or "CUDA error" in text or "device-side assert" in text


class _Worker:
    """One Ray actor: a loaded pipeline and a writer into the shared output directory."""

    def __init__(self, gen: GenerationConfig, cfg: PCCConfig, label_set: LabelSet, writer_args: dict,
                 runner_factory=None, threads: int | None = None):
        t0 = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        self.writer = _TimedWriter(label_set=label_set, **writer_args)
        factory = runner_factory or BatchRunner
        self.runner = factory(gen, cfg, label_set, self.writer)
        self.info = dict(pid=os.getpid(), host=os.uname().nodename, device=gen.device,
                         threads=torch.get_num_threads(), load_seconds=time.perf_counter() - t0)

    def ready(self) -> dict:
        return self.info

    def run(self, entries: list) -> dict:
        self.writer.write_seconds = 0.0
        t0 = time.perf_counter()
        try:
            records = self.runner.run(entries)
        except Exception as exc:
            if _fatal_device_error(exc):
                sys.stderr.write(f"pccfast worker {os.getpid()}: {type(exc).__name__}: {exc}; restarting\n")
                sys.stderr.flush()
                os._exit(1)  # Ray restarts the actor; the driver hands the batch to another worker
            raise
        return dict(records=records, run=time.perf_counter() - t0, write=self.writer.write_seconds,
                    end=time.time())


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
def _connect(ray, address: str | None) -> bool:
    """Start or join Ray unless it is running in this process already; True if we did."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    if address in (None, "", "local"):
        ray.init(address="local", **kwargs)  # a new instance, even if a cluster runs on this host
    else:
        ray.init(address=address, **kwargs)
    return True


def resolve_workers(workers: int | None, device: str, resources: dict, node_cpus: list[float],
                    cpus_per_worker: float | None = None) -> tuple[int, dict]:
    """Number of actors and each one's Ray resources.

    Args:
        workers: requested actors, or None (one per GPU on CUDA, else 1).
        device: the pipeline's torch device; "cuda..." asks for GPU actors.
        resources: ``ray.cluster_resources()``.
        node_cpus: CPUs of each live node.
        cpus_per_worker: CPUs per actor (a CPU actor runs int(cpus) torch threads); default: on
            CUDA 1, on the CPU an even share of the cluster's CPUs (at most one node's).
    Returns: (workers, dict(num_cpus=..., num_gpus=...)) for ``actor.options``.
    """
    if cpus_per_worker is not None and cpus_per_worker <= 0:
        raise ValueError(f"`cpus_per_worker` has to be positive but is {cpus_per_worker}")
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1.0))
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu and gpus == 0:
        raise ValueError(f"`device` is {device!r} but the Ray cluster has no GPU; use --device cpu")
    if workers is None:
        workers = gpus if on_gpu else 1
    if workers < 1:
        raise ValueError(f"`workers` has to be at least 1 but is {workers}")
    if on_gpu:
        per_gpu = math.ceil(workers / gpus)  # more workers than GPUs: share them evenly
        return workers, dict(num_cpus=cpus_per_worker or min(1.0, cpus / workers), num_gpus=1.0 / per_gpu)
    if cpus_per_worker is not None:
        return workers, dict(num_cpus=cpus_per_worker, num_gpus=0)
    share = cpus / workers
    if node_cpus:
        share = min(share, max(node_cpus))
    share = math.floor(share * 1000) / 1000  # Ray adds shares at 1e-4: never ask for more than there is
    return workers, dict(num_cpus=max(share, 0.001), num_gpus=0)


def _remove_stale_temps(out: str, ids) -> int:
    """Temporary files that a killed actor left behind for ``ids`` (atomic_write's ``.tmp-*-<name>``)."""
    n = 0
    for sid in ids:
        for path in dataset_paths(out, sid).values():
            d, name = os.path.split(path)
            for tmp in glob.glob(os.path.join(glob.escape(d), ".tmp-*-" + glob.escape(name))):
                try:
                    os.unlink(tmp)
                    n += 1
                except FileNotFoundError:
                    pass
    return n


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _message(exc: BaseException) -> str:
    """One line: the original exception of a Ray error (the last line of a remote traceback)."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    lines = [x.strip() for x in _ANSI.sub("", str(exc)).strip().splitlines() if x.strip()]
    if len(lines) > 1 and any(x.startswith("File ") for x in lines):  # a traceback: its last line says it
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@dataclass
class _Batch:
    entries: list
    attempts: int = 0
    error: str = ""


def run_ray(
    entries: list,
    gen: GenerationConfig,
    cfg: PCCConfig,
    label_set: LabelSet,
    writer: DatasetWriter,
    *,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    inflight: int = 2,
    max_attempts: int = MAX_ATTEMPTS,
    max_restarts: int = 3,
    cpus_per_worker: float | None = None,
    runner_factory=None,
) -> RayReport:
    """Generate ``entries`` on Ray actors; the driver commits the manifest records.

    Args:
        entries: prompt entries (``id``, ``prompt``, ``classes``, ``index``) of this run.
        gen, cfg, label_set: as for :func:`pccfast.generate.run_generation`.
        writer: the driver's writer (its manifest; a shard's manifest with ``--shard``).
        address: None or "local" start a local Ray instance, "auto" joins the running cluster,
            anything else is passed to ``ray.init(address=...)``. A Ray instance already
            initialised in this process is used as it is.
        workers: actors (default: one per GPU of the cluster on CUDA, else 1).
        inflight: batches outstanding per actor (1 or 2 is plenty).
        max_attempts: a batch failing this often is reported in ``failed`` and skipped.
        max_restarts: Ray restarts of each actor after its process died.
        cpus_per_worker: Ray CPUs per actor, which is also a CPU actor's torch thread count
            (default: see :func:`resolve_workers`).
        runner_factory: ``f(gen, cfg, label_set, writer) -> object with run(entries)``
            (default :class:`~pccfast.generate.BatchRunner`; tests pass a fake).
    """
    if inflight < 1:
        raise ValueError(f"`inflight` has to be at least 1 but is {inflight}")
    if max_attempts < 1:
        raise ValueError(f"`max_attempts` has to be at least 1 but is {max_attempts}")
    ray = _import_ray()
    from tqdm.auto import tqdm

    report = RayReport()
    todo, report.skipped = pending(entries, writer)
    if not todo:
        writer.finalize()
        return report

    t0 = time.perf_counter()
    started = _connect(ray, address)
    report.connect_seconds = time.perf_counter() - t0
    actors: list = []
    try:
        cluster = ray.cluster_resources()
        node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        n_workers, _ = resolve_workers(workers, gen.device, cluster, node_cpus, cpus_per_worker)
        n_batches = math.ceil(len(todo) / gen.batch)  # no actor without a batch to run
        n_workers, resources = resolve_workers(min(n_workers, n_batches), gen.device, cluster, node_cpus,
                                               cpus_per_worker)
        actor_gen = gen
        if resources["num_gpus"] > 0:  # Ray sets CUDA_VISIBLE_DEVICES: the actor's own GPU is cuda:0
            actor_gen = replace(gen, device="cuda")
        threads = max(1, int(resources["num_cpus"])) if resources["num_gpus"] == 0 else None
        writer_args = dict(out=os.path.abspath(writer.out), save_blocky=writer.save_blocky,
                           save_captures=writer.save_captures, jpeg_quality=writer.jpeg_quality)
        remote_cls = ray.remote(_Worker).options(max_restarts=max_restarts, max_task_retries=0, **resources)
        t_actors = time.perf_counter()
        actors = [remote_cls.remote(actor_gen, cfg, label_set, writer_args, runner_factory, threads)
                  for _ in range(n_workers)]
        report.workers = n_workers
        _drive(ray, actors, todo, gen.batch, writer, report, inflight, max_attempts, progress, t_actors, tqdm)
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        if started:
            ray.shutdown()
        writer.finalize()
    report.seconds = time.perf_counter() - t0
    return report


def _drive(ray, actors, todo, batch_size, writer, report, inflight, max_attempts, progress, t_actors, tqdm):
    """The scheduling loop: ping actors, keep each live one busy, commit, retry, report."""
    from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError

    pending = deque(_Batch(b) for b in batches(todo, batch_size))
    state = ["starting"] * len(actors)  # starting / alive / restarting / dead
    queues = [deque() for _ in actors]  # refs outstanding per actor, in submission order
    tasks: dict = {}  # ref -> (actor slot, batch, submit time)
    pings: dict = {a.ready.remote(): i for i, a in enumerate(actors)}
    reping: list = []  # (time, actor slot): pings to send again once a restarting actor may be back
    committed: set[str] = set()
    touched: set[str] = set()  # ids of batches whose actor died: clean their temp files
    last_error = ""
    bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, desc="generate (ray)")

    def give_back(batch: _Batch, charge: bool, msg: str) -> None:
        nonlocal last_error
        last_error = msg
        batch.attempts += charge
        batch.error = msg
        if batch.attempts >= max_attempts:
            ids = [e.id for e in batch.entries]
            report.failed.append((ids, msg))
            tqdm.write(f"error: batch {ids[0]}..{ids[-1]} failed {batch.attempts} times, skipped: {msg}",
                       file=sys.stderr)
            bar.update(len(ids))
        else:
            report.retried += 1
            pending.appendleft(batch)

    def actor_died(i: int, msg: str) -> None:
        report.restarts += 1
        refs = list(queues[i])
        queues[i].clear()
        for j, ref in enumerate(reversed(refs)):  # reversed + appendleft keeps the original order
            _, batch, _ = tasks.pop(ref)
            touched.update(e.id for e in batch.entries)
            give_back(batch, charge=(j == len(refs) - 1), msg=msg)  # only the oldest was running
        state[i] = "restarting"
        pings[actors[i].ready.remote()] = i

    try:
        while True:
            for i, a in enumerate(actors):  # fill every live actor up to `inflight`
                while state[i] == "alive" and pending and len(queues[i]) < inflight:
                    batch = pending.popleft()
                    ref = a.run.remote(batch.entries)
                    queues[i].append(ref)
                    tasks[ref] = (i, batch, time.perf_counter())
            if not tasks and not pending:
                break
            if pending and (all(s == "dead" for s in state) or not (tasks or pings or reping)):
                msg = f"no Ray worker is left (all {len(actors)} died or could not start); last error: {last_error}"
                while pending:
                    batch = pending.popleft()
                    report.failed.append(([e.id for e in batch.entries], batch.error or msg))
                    bar.update(len(batch.entries))
                if report.done == 0:
                    raise RayRunError(msg)
                break
            now = time.perf_counter()
            for when, i in [r for r in reping if r[0] <= now]:
                reping.remove((when, i))
                pings[actors[i].ready.remote()] = i
            wait = min([5.0] + [max(0.0, when - now) for when, _ in reping])
            if not tasks and not pings:
                time.sleep(wait)
                continue
            ready, _ = ray.wait(list(tasks) + list(pings), num_returns=1, timeout=wait)
            for ref in ready:
                if ref in pings:
                    i = pings.pop(ref)
                    try:
                        info = ray.get(ref)
                    except ActorUnavailableError:  # restarting: ask again shortly
                        reping.append((time.perf_counter() + 0.5, i))
                        continue
                    except RayError as exc:
                        state[i] = "dead"  # restarts exhausted or the constructor failed
                        last_error = _message(exc)
                        tqdm.write(f"error: Ray worker {i} is gone: {last_error}", file=sys.stderr)
                        continue
                    if state[i] == "starting" and not report.load_seconds:
                        report.startup_seconds = time.perf_counter() - t_actors
                    report.load_seconds.append(info["load_seconds"])
                    state[i] = "alive"
                    continue
                if ref not in tasks:  # given back already when its actor died
                    continue
                i, batch, _ = tasks[ref]
                try:
                    out = ray.get(ref)
                except RayTaskError as exc:  # the batch raised; the actor lives on
                    tasks.pop(ref)
                    queues[i].remove(ref)
                    give_back(batch, charge=True, msg=_message(exc))
                    continue
                except (RayActorError, RayError) as exc:  # the actor's process is gone
                    tqdm.write(f"warning: Ray worker {i} died ({_message(exc)}); its batches go to the others",
                               file=sys.stderr)
                    actor_died(i, _message(exc))
                    continue
                tasks.pop(ref)
                queues[i].remove(ref)
                received = time.time()
                fresh = [r for r in out["records"] if str(r["id"]) not in committed]
                for r in fresh:
                    writer.commit(r)
                    committed.add(str(r["id"]))
                report.done += len(fresh)
                report.batch_stats.append(BatchStat(len(out["records"]), out["run"], out["write"],
                                                    max(0.0, received - out["end"]), i))
                bar.update(len(batch.entries))
                alive = sum(s == "alive" for s in state)
                rate = report.done / max(time.perf_counter() - t_actors, 1e-9)  # over all workers
                bar.set_postfix_str(f"{rate:.2f} img/s, {alive}/{len(actors)} workers")
    finally:
        bar.close()
        _remove_stale_temps(writer.out, touched)
