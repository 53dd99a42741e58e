"""Ray backend of the run engine (``generate --ray`` and ``relabel --ray``): many GPUs, many machines.

Each worker is a Ray actor that builds the run's step once on its own device (one GPU per
actor; on a CPU-only cluster a share of the CPUs: for ``generate`` that loads the pipeline)
and runs batches through it (:func:`pccfast.runs.engine.run_batch`), writing every file of an
item atomically straight into the output directory. The driver owns the store (manifest),
the progress bar and the report, exactly as :func:`pccfast.runs.engine.run_local` does:

* **dynamic load balancing** -- each live actor holds at most ``inflight`` batches (default
  2, so it never waits for the driver); the next batch goes to whichever actor finishes
  first (``ray.wait``), so a fast GPU takes more batches than a slow one;
* **commit point** -- a batch's manifest lines are appended by the driver only after the
  actor has returned, i.e. after all its files exist; a record is never committed twice;
* **faults** -- a batch that raises in a worker is run again item by item there, so its good
  items are written and the others reported one line each; an actor that dies (killed process, lost node, CUDA error) is restarted by
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

import importlib.util
import math
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass

import torch

from pccfast.data.fileio import remove_temps_of
from pccfast.runs.engine import RunError, error_line, fatal_device_error, run_batch
from pccfast.runs.plan import batches, pending
from pccfast.runs.progress import Progress
from pccfast.runs.report import BatchStat, RunReport

__all__ = ["ray_available", "run_ray", "resolve_workers"]

MAX_ATTEMPTS = 3  # a batch that fails this often is reported and skipped
INSTALL_HINT = 'the Ray backend (--ray) needs Ray: pip install "pccfast[ray]" (or pip install "ray>=2.9")'


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
class _Worker:
    """One Ray actor: the run's step, built once on the actor's device."""

    def __init__(self, make_step, device: str, threads: int | None = None):
        t0 = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        self.step = make_step(device)
        self.info = dict(pid=os.getpid(), host=os.uname().nodename, device=device,
                         threads=torch.get_num_threads(), load_seconds=time.perf_counter() - t0)

    def ready(self) -> dict:
        return self.info

    def run(self, items: list) -> dict:
        t0 = time.perf_counter()
        try:
            records, failures, write = run_batch(self.step, items)
        except Exception as exc:
            if fatal_device_error(exc):
                sys.stderr.write(f"pccfast worker {os.getpid()}: {type(exc).__name__}: {exc}; restarting\n")
                sys.stderr.flush()
                os._exit(1)  # Ray restarts the actor; the driver hands the batch to another worker
            raise
        return dict(records=records, failures=failures, run=time.perf_counter() - t0, write=write, end=time.time())


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
    make_step,
    items: list,
    store,
    *,
    batch: int,
    device: str = "cpu",
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "run",
    inflight: int = 2,
    max_attempts: int = MAX_ATTEMPTS,
    max_restarts: int = 3,
    cpus_per_worker: float | None = None,
) -> RunReport:
    """Run ``make_step`` over ``items`` on Ray actors; the driver commits to ``store``.

    Args:
        make_step: ``make_step(device) -> Step``, picklable (built in each actor).
        items, store, batch, progress, desc: as for :func:`pccfast.runs.engine.run_local`;
            ``store`` also gives ``paths(id)``, the files of an item (a dead actor's
            temporaries for them are removed).
        device: the step's torch device; "cuda..." asks for one GPU per actor (inside the
            actor its GPU is ``cuda``).
        address: None or "local" start a local Ray instance, "auto" joins the running
            cluster, anything else is passed to ``ray.init(address=...)``. A Ray instance
            already initialised in this process is used as it is.
        workers: actors (default: one per GPU of the cluster on CUDA, else 1).
        inflight: batches outstanding per actor (1 or 2 is plenty).
        max_attempts: a batch whose actor died this often is reported in ``failures`` and skipped.
        max_restarts: Ray restarts of each actor after its process died.
        cpus_per_worker: Ray CPUs per actor, which is also a CPU actor's torch thread count
            (default: see :func:`resolve_workers`).
    """
    if inflight < 1:
        raise ValueError(f"`inflight` has to be at least 1 but is {inflight}")
    if max_attempts < 1:
        raise ValueError(f"`max_attempts` has to be at least 1 but is {max_attempts}")
    if workers is not None and workers < 1:
        raise ValueError(f"`workers` has to be at least 1 but is {workers}")
    ray = _import_ray()

    report = RunReport()
    todo, report.skipped = pending(items, store)
    if not todo:
        store.finalize()
        return report

    t0 = time.perf_counter()
    started = _connect(ray, address)
    report.connect_seconds = time.perf_counter() - t0
    actors: list = []
    try:
        cluster = ray.cluster_resources()
        node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        n_workers, _ = resolve_workers(workers, device, cluster, node_cpus, cpus_per_worker)
        n_batches = math.ceil(len(todo) / batch)  # no actor without a batch to run
        n_workers, resources = resolve_workers(min(n_workers, n_batches), device, cluster, node_cpus,
                                               cpus_per_worker)
        # Ray sets CUDA_VISIBLE_DEVICES: the actor's own GPU is cuda:0
        actor_device = "cuda" if resources["num_gpus"] > 0 else device
        threads = max(1, int(resources["num_cpus"])) if resources["num_gpus"] == 0 else None
        remote_cls = ray.remote(_Worker).options(max_restarts=max_restarts, max_task_retries=0, **resources)
        t_actors = time.perf_counter()
        actors = [remote_cls.remote(make_step, actor_device, threads) for _ in range(n_workers)]
        report.workers = n_workers
        _drive(ray, actors, todo, batch, store, report, inflight, max_attempts, progress, desc, t_actors)
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        if started:
            ray.shutdown()
        store.finalize()
    report.seconds = time.perf_counter() - t0
    return report


def _drive(ray, actors, todo, batch_size, store, report, inflight, max_attempts, progress, desc, t_actors):
    """The scheduling loop: ping actors, keep each live one busy, commit, retry, report."""
    from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError

    queue = deque(_Batch(b) for b in batches(todo, batch_size))
    state = ["starting"] * len(actors)  # starting / alive / restarting / dead
    queues = [deque() for _ in actors]  # refs outstanding per actor, in submission order
    tasks: dict = {}  # ref -> (actor slot, batch, submit time)
    pings: dict = {a.ready.remote(): i for i, a in enumerate(actors)}
    reping: list = []  # (time, actor slot): pings to send again once a restarting actor may be back
    committed: set[str] = set()
    touched: set[str] = set()  # ids of batches whose actor died: clean their temp files
    last_error = ""
    bar = Progress(len(todo), f"{desc} (ray)", enabled=progress, skipped=len(report.skipped))

    def give_back(batch: _Batch, charge: bool, msg: str) -> None:
        nonlocal last_error
        last_error = msg
        batch.attempts += charge
        batch.error = msg
        if batch.attempts >= max_attempts:
            for e in batch.entries:
                line = f"{e.id}: {msg} (its worker died {batch.attempts} times)"
                report.failures.append((e.id, line))
                bar.log(error_line(e.id, line))
            bar.advance(len(batch.entries), finished=0)
        else:
            report.retried += 1
            queue.appendleft(batch)

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
                while state[i] == "alive" and queue and len(queues[i]) < inflight:
                    batch = queue.popleft()
                    ref = a.run.remote(batch.entries)
                    queues[i].append(ref)
                    tasks[ref] = (i, batch, time.perf_counter())
            if not tasks and not queue:
                break
            if queue and (all(s == "dead" for s in state) or not (tasks or pings or reping)):
                msg = f"no Ray worker is left (all {len(actors)} died or could not start); last error: {last_error}"
                while queue:
                    batch = queue.popleft()
                    report.failures += [(e.id, f"{e.id}: {batch.error or msg}") for e in batch.entries]
                    bar.advance(len(batch.entries), finished=0)
                if report.done == 0:
                    raise RunError(msg)
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
                        bar.log(f"error: Ray worker {i} is gone: {last_error}")
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
                    bar.log(f"warning: Ray worker {i} died ({_message(exc)}); its batches go to the others")
                    actor_died(i, _message(exc))
                    continue
                tasks.pop(ref)
                queues[i].remove(ref)
                received = time.time()
                for sid, msg in out["failures"]:
                    report.failures.append((sid, msg))
                    bar.log(error_line(sid, msg))
                fresh = [r for r in out["records"] if str(r["id"]) not in committed]
                for r in fresh:
                    store.commit(r)
                    committed.add(str(r["id"]))
                    report.written.append(str(r["id"]))
                report.batch_stats.append(BatchStat(len(out["records"]), out["run"], out["write"],
                                                    max(0.0, received - out["end"]), i))
                alive = sum(s == "alive" for s in state)
                bar.advance(len(batch.entries), finished=len(fresh), extra=f"{alive}/{len(actors)} workers")
    finally:
        bar.close()
        remove_temps_of(p for sid in touched for p in store.paths(sid))
