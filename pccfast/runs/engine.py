"""The one run loop: a *step* applied to batches of items, with resume, progress, faults, report.

``generate`` and ``relabel`` are both a :class:`Step` over a work list; this module runs one
in this process (:func:`run_local`) and :mod:`pccfast.runs.ray` runs it on Ray workers, with
the same contract:

* **resume** -- the store's done ids are skipped (:func:`pccfast.runs.plan.pending`);
* **commit** -- an item's record is committed to the store by the driver only after the step
  has written all its files, once per id, as soon as its batch is written;
* **faults** -- a batch whose ``process`` or ``write`` raises (an out-of-memory batch, say) is
  run again item by item, so its good items are still written; the items that fail alone
  are reported as one line each. Bad inputs found by ``prepare`` are reported, not retried;
* **overlap** -- with ``io_threads`` > 0 the next batch is prepared (its inputs read) on a
  background thread while this one is processed, and finished and written on a writer thread
  behind it: a step with a ``finish`` stage (generate: the labeller and the copy to the host)
  has batch i finished and written while batch i+1 is processed (diffused). At most two
  processed batches wait for the writer, so memory stays flat;
* **Ctrl-C** -- files being written are finished and committed, then KeyboardInterrupt
  propagates: running the same command again resumes.

A step is built by a factory ``make_step(device) -> Step`` (picklable for Ray, e.g. a
``functools.partial`` of the step class), only once there is work to do.
"""
from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from pccfast.runs.plan import batches, pending
from pccfast.runs.progress import Progress
from pccfast.runs.report import RunReport

__all__ = ["Step", "Prepared", "RunError", "run_local", "run_batch", "prefetched", "one_line", "failure_line", "error_line",
           "fatal_device_error"]


class RunError(RuntimeError):
    """The run could not go on (the step could not be built, no worker is left); one line."""


@dataclass
class Prepared:
    """A batch whose inputs were read: ``items`` that are ready, ``data`` for the step,
    ``failures`` (id, message) of the items that could not be read."""

    items: list
    data: Any = None
    failures: list = field(default_factory=list)


class Step(Protocol):
    """What a run applies to each batch. ``name`` labels the progress bar."""

    name: str

    def prepare(self, items: list) -> Prepared:
        """Read the items' inputs (I/O); a bad input is a failure, not an exception."""

    def process(self, prepared: Prepared) -> Any:
        """The device work on a prepared batch; may raise (then the batch is retried item by item)."""

    # optional: ``finish(prepared, result) -> result``, more device work on a processed batch
    # (generate's labeller) that the local loop runs on the writer thread, overlapped with the
    # next batch's ``process``; if it raises, the batch is retried item by item like ``process``

    def write(self, prepared: Prepared, result: Any) -> tuple[list[dict], list[tuple[str, str]]]:
        """Write the batch's files; returns (records of the items written, each with ``id``;
        (id, message) of the items that could not be written)."""

    # optional: ``failure(item, exc) -> str``, the line for an item whose ``process`` raised
    # (default ``"<id>: <Type>: <message>"``); ``close()``, called when the run ends


def failure_line(step, item, exc: BaseException) -> str:
    """The one-line message for ``item`` whose batch raised ``exc`` in ``step.process``."""
    describe = getattr(step, "failure", None)
    return describe(item, exc) if describe is not None else f"{item.id}: {one_line(exc)}"


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = next((x.strip() for x in str(exc).splitlines() if x.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def prefetched(items: Iterable, depth: int, name: str = "pccfast-prefetch") -> Iterator:
    """Yield ``items`` in order, produced up to ``depth`` ahead by a background thread.

    An exception raised by ``items`` is raised here, at its place in the order. Closing this
    generator (also by an exception or Ctrl-C in the consumer) stops and joins the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        it = iter(items)
        try:
            for x in it:
                if not put((True, x)):
                    return
        except BaseException as e:  # handed to the consumer
            put((False, e))
            return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        put((False, None))

    # a daemon: it only reads, so nothing is left half-written if the interpreter ends under it
    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            ok, x = q.get()
            if ok:
                yield x
            elif x is None:
                return
            else:
                raise x
    finally:
        stop.set()
        thread.join()


def fatal_device_error(exc: BaseException) -> bool:
    """CUDA errors leave the context unusable: the process has to go (a Ray worker is
    restarted; the local loop stops with one line), retrying in it cannot help."""
    text = str(exc)
    return type(exc).__name__ == "AcceleratorError" or "CUDA error" in text or "device-side assert" in text


def _written(step: Step, prepared: Prepared, result) -> tuple[list, list]:
    """``step.write``; an exception fails every item of the batch (one line each)."""
    try:
        return step.write(prepared, result)
    except Exception as exc:
        return [], [(e.id, f"{e.id}: cannot write: {one_line(exc)}") for e in prepared.items]


@contextlib.contextmanager
def _device_lost_is_fatal():
    """A fatal device error raised inside becomes the run's one-line RunError; others pass."""
    try:
        yield
    except Exception as exc:
        if fatal_device_error(exc):
            raise RunError(f"{one_line(exc)}; the device cannot be used any more: finished work is kept, "
                           "run the same command again to resume") from exc
        raise


def _finished(step: Step, prepared: Prepared, result):
    """``step.finish(prepared, result)`` for a step that has that stage, else ``result``."""
    finish = getattr(step, "finish", None)
    return result if finish is None else finish(prepared, result)


def _retried(step: Step, prepared: Prepared, exc: BaseException) -> tuple[list, list, float]:
    """The batch whose ``process`` or ``finish`` raised ``exc``, once more item by item:
    (records, failures, write seconds); an item that fails alone is one line. A fatal device
    error is raised (retrying in this process cannot help)."""
    if fatal_device_error(exc):
        raise exc
    if len(prepared.items) == 1:
        return [], [(prepared.items[0].id, failure_line(step, prepared.items[0], exc))], 0.0
    records, failures, t_write = [], [], 0.0
    for item in prepared.items:
        r, f, t = run_batch(step, [item])
        records, failures, t_write = records + r, failures + f, t_write + t
    return records, failures, t_write


def _process(step: Step, prepared: Prepared, finish: bool = True):
    """``step.process`` (and ``finish`` unless told not to), or, when it raises, the batch once more item by item.

    Returns ``(result, None)``, or ``(None, (records, failures, write seconds))`` of the retry:
    the good items of a failed batch are still written; an item that fails alone is one line.
    A fatal device error is raised (retrying in this process cannot help).
    """
    try:
        result = step.process(prepared)
        return (_finished(step, prepared, result) if finish else result), None
    except Exception as exc:
        return None, _retried(step, prepared, exc)


def run_batch(step: Step, items: list) -> tuple[list, list, float]:
    """Prepare, process, finish and write one batch in line (with the item-by-item retry).

    Returns (records, failures, seconds spent writing). Used by Ray workers; the local loop
    does the same with its stages overlapped.
    """
    prepared = step.prepare(items)
    if not prepared.items:
        return [], list(prepared.failures), 0.0
    result, retried = _process(step, prepared)
    if retried is not None:
        records, failures, t_write = retried
        return records, prepared.failures + failures, t_write
    t0 = time.perf_counter()
    records, failures = _written(step, prepared, result)
    return records, prepared.failures + failures, time.perf_counter() - t0


class _Sink:
    """The driver's bookkeeping: commits records once per id, records failures, moves the bar.

    Thread-safe: the local loop's writer thread commits each batch as soon as its files are
    written (so a kill loses at most the batches in flight), the main thread reports the rest."""

    def __init__(self, store, report: RunReport, bar: Progress, log: bool):
        self.store, self.report, self.bar, self.log = store, report, bar, log
        self.committed: set[str] = set()
        self.lock = threading.Lock()

    def failed(self, failures: list) -> None:
        with self.lock:
            for sid, msg in failures:
                self.report.failures.append((sid, msg))
                if self.log:
                    self.bar.log(error_line(sid, msg))
            if failures:
                self.bar.advance(len(failures), finished=0)

    def written(self, records: list, extra: str | None = None) -> None:
        with self.lock:
            fresh = [r for r in records if str(r["id"]) not in self.committed]
            for r in fresh:
                self.store.commit(r)
                self.committed.add(str(r["id"]))
                self.report.written.append(str(r["id"]))
            self.bar.advance(len(records), finished=len(fresh), extra=extra)

    def settle(self, records: list, failures: list) -> None:
        """A written batch: its failures, then its records committed."""
        self.failed(failures)
        self.written(records)


def error_line(sid: str, msg: str) -> str:
    """The line printed for a failed item (its message names the item or its file)."""
    return f"error: {msg}"


def run_local(
    make_step: Callable[[str], Step],
    items: list,
    store,
    *,
    batch: int,
    device: str = "cpu",
    io_threads: int = 1,
    progress: bool = True,
    desc: str = "run",
    log: bool = True,
) -> RunReport:
    """Run ``make_step(device)`` over ``items`` in this process.

    Args:
        make_step: builds the step (called once, only if something is left to do).
        items: the work list (objects with ``id`` and ``index``), already sharded.
        store: the driver's side of the output: ``write_plan(ids)``, ``done_ids()``,
            ``commit(record)``, ``finalize()`` (e.g. :class:`pccfast.data.manifest.Manifest`).
        batch: items per ``process`` call.
        io_threads: 0 runs every stage in line; more overlaps reading and writing with processing.
        progress: show the progress bar; ``desc`` labels it.
        log: print an ``error:`` line above the bar for each failure as it happens.
    Raises:
        RunError: the step could not be built (one line).
    """
    t0 = time.perf_counter()
    report = RunReport()
    todo, report.skipped = pending(items, store)
    if not todo:
        store.finalize()
        return report
    try:
        step = make_step(device)
    except Exception as exc:
        raise RunError(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from exc
    bar = Progress(len(todo), desc, enabled=progress, skipped=len(report.skipped))
    sink = _Sink(store, report, bar, log)
    stages = (step.prepare(b) for b in batches(todo, batch))
    if io_threads > 0:
        stages = prefetched(stages, depth=1, name=f"pccfast-{desc}-prepare")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pccfast-{desc}-write") if io_threads > 0 else None
    writing: collections.deque = collections.deque()  # futures of finish_write_and_commit, oldest first

    def finish_write_and_commit(prepared: Prepared, result):  # on the writer thread
        """Finish and write a processed batch; returns the exception of a ``finish`` that
        raised (the main thread retries that batch item by item), else None."""
        try:
            result = _finished(step, prepared, result)
        except Exception as exc:
            if fatal_device_error(exc):
                raise
            return prepared, exc
        sink.settle(*_written(step, prepared, result))
        return None

    def collect(oldest_only: bool) -> None:
        """Wait for the writer's oldest batch (or all of them); retry a batch whose finish failed."""
        while writing:
            with _device_lost_is_fatal():
                failed = writing.popleft().result()  # (raises what the writer could not handle)
            if failed is not None:  # in line, once the writer has nothing else in hand
                collect(oldest_only=False)
                prepared, exc = failed
                report.retried += len(prepared.items) > 1
                with _device_lost_is_fatal():
                    sink.settle(*_retried(step, prepared, exc)[:2])
            if oldest_only:
                return

    try:
        for prepared in stages:
            sink.failed(prepared.failures)
            if not prepared.items:
                continue
            with _device_lost_is_fatal():
                result, retried = _process(step, prepared, finish=writer is None)
            if retried is not None:
                report.retried += len(prepared.items) > 1
                sink.settle(*retried[:2])
                continue
            if writer is None:
                sink.settle(*_written(step, prepared, result))
            else:
                writing.append(writer.submit(finish_write_and_commit, prepared, result))
                while writing and (writing[0].done() or len(writing) > 2):  # at most 2 batches wait
                    collect(oldest_only=True)
        collect(oldest_only=False)
    finally:
        close = getattr(stages, "close", None)
        if close is not None:
            close()  # stops the prepare thread
        if writer is not None:  # batches already processed are written whole and committed (Ctrl-C too)
            writer.shutdown(wait=True)
        bar.close()
        if hasattr(step, "close"):
            step.close()
        store.finalize()
        report.seconds = time.perf_counter() - t0
    return report
