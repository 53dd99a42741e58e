"""Relabel saved captures: ``<id>.safetensors`` + ``<id>.jpg`` -> ``SegmentationClass/<id>.png``.

Run the labeller again on captures written by ``python -m pccfast.generate --save-captures``
(for example with other settings) without running Stable Diffusion again::

    python -m pccfast.relabel --captures OUT/captures --images OUT/JPEGImages --out relabelled

Captures of one size go through :func:`pccfast.labeller.label_images` in batches. Every
output file is written atomically, the mask last, so an existing mask means the id is done:
a second run skips it (resume) unless ``--overwrite``. A bad input (missing or unreadable
image, an image size that is not a multiple of the capture grid, a broken capture) is
reported as one line naming the file and the run goes on; the exit status is then 1.

In memory there is nothing to wrap: call :func:`pccfast.labeller.label_images` directly.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from pccfast.data.captures import read_capture
from pccfast.core.config import PCCConfig
from pccfast.data.fileio import atomic_write_bytes, check_id, clean_stale_temps, load_image, save_mask_png
from pccfast.data.labelsets import get_label_set
from pccfast.core.labelset import LabelSet

__all__ = ["RelabelReport", "relabel_dir", "find_inputs", "build_parser", "main"]

MASK_DIR = "SegmentationClass"
BLOCKY_DIR = "SegmentationClassBlocky"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")  # looked up in this order, case-insensitively


@dataclass
class RelabelReport:
    """What a :func:`relabel_dir` run did."""

    written: list[str] = field(default_factory=list)  # ids whose outputs were written
    skipped: list[str] = field(default_factory=list)  # ids already done (resume)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (id, one-line message naming the file)
    seconds: float = 0.0  # wall time of the run

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def images_per_second(self) -> float:
        return len(self.written) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Item:
    id: str
    capture: str
    features: np.ndarray  # (D, h, w) float32, usually a view of the memory-mapped file
    class_attention: np.ndarray  # (K, h, w) float32
    image: np.ndarray  # (H, W, 3) uint8


@dataclass
class _Batch:
    ids: list[str]
    captures: list[str]
    features: torch.Tensor  # (B, D, h, w) float32
    class_attention: torch.Tensor  # (B, K, h, w) float32
    images: torch.Tensor  # (B, 3, H, W) uint8

    def one(self, i: int) -> "_Batch":
        """Item ``i`` alone (views, no copy)."""
        return _Batch(self.ids[i:i + 1], self.captures[i:i + 1], self.features[i:i + 1],
                      self.class_attention[i:i + 1], self.images[i:i + 1])


def find_inputs(captures: str, images: str) -> list[tuple[str, str, str | None]]:
    """(id, capture path, image path or None) for every ``<id>.safetensors`` in ``captures``,
    sorted by id; the image is ``<id>.jpg``, ``.jpeg`` or ``.png`` in ``images`` (first found)."""
    by_stem: dict[str, str] = {}
    for name in sorted(os.listdir(images)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS:
            best = by_stem.get(stem)
            if best is None or IMAGE_EXTS.index(ext.lower()) < IMAGE_EXTS.index(os.path.splitext(best)[1].lower()):
                by_stem[stem] = name
    out = []
    for name in sorted(os.listdir(captures)):
        if name.startswith(".") or not name.endswith(".safetensors"):
            continue  # hidden files and temporaries of atomic writes
        stem = name[: -len(".safetensors")]
        image = by_stem.get(stem)
        out.append((stem, os.path.join(captures, name), None if image is None else os.path.join(images, image)))
    return out


def _load(sample_id: str, capture: str, image: str | None, images_dir: str, label_set: LabelSet) -> _Item:
    """Read and check one input pair; ValueError with a one-line message naming the file."""
    check_id(sample_id)
    cap = read_capture(capture, label_set)
    if image is None:
        names = ", ".join(sample_id + e for e in IMAGE_EXTS)
        raise ValueError(f"{capture}: no image for it in {images_dir} (expected one of {names})")
    try:
        pixels = load_image(image)  # (H, W, 3) uint8
    except Exception as e:  # PIL raises several types for broken or foreign files
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{image}: cannot read the image: {first}") from None
    height, width = pixels.shape[:2]
    h, w = cap.grid
    if height % h or width % w:
        raise ValueError(
            f"{image}: image is {width}x{height} (width x height) but has to be a multiple of the capture grid "
            f"{w}x{h} of {capture}"
        )
    return _Item(sample_id, capture, cap.features.numpy(), cap.class_attention.numpy(), pixels)


class _Bucket:
    """Items of one size, copied into preallocated batch arrays as they arrive (so the copy
    of one overlaps the reading of the next). NumPy copies on the calling thread: torch.stack
    was 5-10x slower here and, beside the labeller, would share its intra-op threads."""

    def __init__(self, first: _Item, batch: int, size: int):
        self.full = batch  # a batch is given at this many items...
        # ...and the arrays hold ``size`` <= ``batch``: as many as the inputs left can fill
        self.ids: list[str] = []
        self.captures: list[str] = []
        self.features = np.empty((size,) + first.features.shape, first.features.dtype)  # (B, D, h, w)
        self.class_attention = np.empty((size,) + first.class_attention.shape, first.class_attention.dtype)  # (B, K, h, w)
        h, w, c = first.image.shape
        self.images = np.empty((size, c, h, w), first.image.dtype)  # (B, 3, H, W)

    def add(self, item: _Item) -> bool:
        """Copy ``item`` in; True when the bucket is full."""
        i = len(self.ids)
        np.copyto(self.features[i], item.features)
        np.copyto(self.class_attention[i], item.class_attention)
        np.copyto(self.images[i], item.image.transpose(2, 0, 1))  # (3, H, W) from (H, W, 3)
        self.ids.append(item.id)
        self.captures.append(item.capture)
        return len(self.ids) == self.full

    def batch(self) -> _Batch:
        k = len(self.ids)  # the first k slots (views; a partly filled bucket's rest was never touched)
        return _Batch(self.ids, self.captures, torch.from_numpy(self.features[:k]),
                      torch.from_numpy(self.class_attention[:k]), torch.from_numpy(self.images[:k]))


def _events(todo: list, load: Callable, batch: int, pool: "ThreadPoolExecutor | None") -> Iterator[tuple]:
    """``("failed", id, message)`` and ``("batch", _Batch)`` in input order.

    Items are grouped by size into batches of ``batch``; a batch is given when it fills,
    the partly filled ones at the end. With a ``pool``, up to ``2 * batch`` inputs are
    read ahead in its threads; ``load(entry)`` returns an ``_Item`` or the ValueError.
    """
    buckets: dict[tuple, _Bucket] = {}
    ahead: collections.deque = collections.deque()
    queue_ = iter(todo)
    left = len(todo)  # inputs not yet taken: no bucket is allocated larger than it can fill
    while True:
        while pool is not None and len(ahead) < 2 * batch:
            entry = next(queue_, None)
            if entry is None:
                break
            ahead.append((entry, pool.submit(load, entry)))
        if pool is not None:
            if not ahead:
                break
            entry, fut = ahead.popleft()
            item = fut.result()
        else:
            entry = next(queue_, None)
            if entry is None:
                break
            item = load(entry)
        left -= 1
        if isinstance(item, Exception):
            yield ("failed", entry[0], str(item))
            continue
        key = (item.features.shape, item.class_attention.shape, item.image.shape)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket(item, batch, min(batch, left + 1))
        if bucket.add(item):
            del buckets[key]
            yield ("batch", bucket.batch())
    for bucket in buckets.values():
        yield ("batch", bucket.batch())


def _prefetched(items: Iterable, depth: int, name: str = "pccfast-prefetch") -> Iterator:
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


def _out_paths(out: str, sample_id: str) -> tuple[str, str]:
    return os.path.join(out, MASK_DIR, sample_id + ".png"), os.path.join(out, BLOCKY_DIR, sample_id + ".png")


def _label_fn():
    # looked up at run time: pccfast.labeller imports the whole labeller core
    return importlib.import_module("pccfast.core.labeller").label_images


def relabel_dir(
    captures: str,
    images: str,
    out: str,
    cfg: PCCConfig | None = None,
    *,
    batch: int = 8,
    device: "str | torch.device | None" = None,
    save_blocky: bool = False,
    label_set: "str | LabelSet" = "voc",
    limit: int | None = None,
    overwrite: bool = False,
    workers: int = 2,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> RelabelReport:
    """Label every capture in ``captures`` with its image from ``images`` into ``out``.

    Args:
        captures: folder of ``<id>.safetensors`` capture files.
        images: folder of ``<id>.jpg`` / ``.jpeg`` / ``.png`` images (H, W multiples of the grid).
        out: dataset folder; masks go to ``out/SegmentationClass/<id>.png`` (palette PNG).
        cfg: labeller settings (default: the reference's). Its ``ignore_index`` is taken
            from the label set.
        batch: captures of one size labelled per ``label_images`` call.
        device: where to label (default: cuda if available, else cpu).
        save_blocky: also write ``out/SegmentationClassBlocky/<id>.png`` (image size).
        label_set: the label set the captures follow (name, file or LabelSet).
        limit: only the first ``limit`` captures (sorted by id).
        overwrite: relabel ids whose outputs exist (default: skip them).
        workers: threads reading inputs ahead of the labeller; with any, one more thread
            batches them ahead and one writes the masks behind it (0: all in line).
        progress: show a tqdm progress bar on stderr.
        log: called with each failure's one-line message as it happens.
    Returns:
        :class:`RelabelReport`; bad inputs are in ``failures``, never raised.
    Raises:
        ValueError: a folder is missing or an argument is out of range.
    """
    t0 = time.perf_counter()
    ls = get_label_set(label_set)
    cfg = PCCConfig() if cfg is None else cfg
    if cfg.ignore_index != ls.ignore_index:
        cfg = cfg.replace(ignore_index=ls.ignore_index)
    for name, value in (("batch", batch), ("limit", limit)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` has to be a positive int but is {value!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"`workers` has to be an int >= 0 but is {workers!r}")
    for name, d in (("captures", captures), ("images", images)):
        if not os.path.isdir(d):
            raise ValueError(f"`{name}` has to be a directory but {d!r} is not one")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label_images = _label_fn()

    inputs = find_inputs(captures, images)
    if limit is not None:
        inputs = inputs[:limit]
    for d in (MASK_DIR, BLOCKY_DIR):
        clean_stale_temps(os.path.join(out, d))
    os.makedirs(os.path.join(out, MASK_DIR), exist_ok=True)
    atomic_write_bytes(os.path.join(out, "labelset.json"), (json.dumps(ls.to_json(), indent=1) + "\n").encode())

    report = RelabelReport()
    todo = []
    for entry in inputs:
        mask_path, blocky_path = _out_paths(out, entry[0])
        done = os.path.exists(mask_path) and (not save_blocky or os.path.exists(blocky_path))
        if done and not overwrite:
            report.skipped.append(entry[0])
        else:
            todo.append(entry)

    bar = tqdm(total=len(todo), desc="relabel", unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    if report.skipped:
        bar.set_postfix_str(f"{len(report.skipped)} already done")
    palette = ls.flat_palette()

    # report, bar and log are touched on this thread only; the writer thread returns its outcomes
    def failed(sample_id: str, message: str) -> None:
        report.failures.append((sample_id, message))
        if log is not None:
            with tqdm.external_write_mode(file=sys.stderr):  # clears the bar, redraws it after
                log(message)
        bar.update(1)

    def save(ids: list[str], masks: np.ndarray, blocky: "np.ndarray | None") -> list[tuple[str, str | None]]:
        """Write one batch's PNGs; (id, None) or (id, one-line message) per id."""
        outcome = []
        for i, sample_id in enumerate(ids):
            mask_path, blocky_path = _out_paths(out, sample_id)
            try:
                if blocky is not None:
                    save_mask_png(blocky_path, blocky[i], palette)
                save_mask_png(mask_path, masks[i], palette)  # last: a mask marks the id as done
            except OSError as e:
                outcome.append((sample_id, f"{mask_path}: cannot write: {e.strerror or e}"))
                continue
            outcome.append((sample_id, None))
        return outcome

    def saved(outcome: list[tuple[str, str | None]]) -> None:
        for sample_id, message in outcome:
            if message is None:
                report.written.append(sample_id)
                bar.update(1)
            else:
                failed(sample_id, message)

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pccfast-relabel-write") if workers > 0 else None
    writing: collections.deque = collections.deque()  # futures of save(), oldest first

    def label(b: _Batch) -> None:
        try:
            res = label_images(b.features.to(device), b.class_attention.to(device), b.images.to(device), cfg,
                               return_blocky=save_blocky)
        except (ValueError, RuntimeError) as e:  # includes out-of-memory: retry one at a time
            if len(b.ids) > 1:
                for i in range(len(b.ids)):
                    label(b.one(i))
                return
            first = (str(e).splitlines() or [type(e).__name__])[0]
            failed(b.ids[0], f"{b.captures[0]}: labelling failed: {first}")
            return
        masks = res.mask.to("cpu", torch.uint8).numpy()  # (B, H, W)
        blocky = res.blocky_full.to("cpu", torch.uint8).numpy() if save_blocky else None  # (B, H, W)
        if writer is None:
            saved(save(b.ids, masks, blocky))
            return
        writing.append(writer.submit(save, b.ids, masks, blocky))
        while writing and (writing[0].done() or len(writing) > 2):  # at most 2 batches wait to be written
            saved(writing.popleft().result())

    def load(entry):
        try:
            return _load(*entry[:3], images, ls)
        except ValueError as e:  # CaptureError is a ValueError
            return e

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pccfast-relabel-read") if workers > 0 else None
    events = _events(todo, load, batch, pool)
    if pool is not None:  # the next batch is read and stacked while this one is labelled
        events = _prefetched(events, depth=1, name="pccfast-relabel-batches")
    try:
        for event in events:
            if event[0] == "failed":
                failed(event[1], event[2])
            else:
                label(event[1])
        while writing:
            saved(writing.popleft().result())
    finally:
        events.close()  # stops the batching thread
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if writer is not None:
            writer.shutdown(wait=True)  # masks already labelled are written whole (Ctrl-C too)
        bar.close()
    report.seconds = time.perf_counter() - t0
    return report


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from pccfast.cli.common import add_config_arguments, add_device_arguments, add_label_set_argument, positive_int

    p = argparse.ArgumentParser(
        prog="python -m pccfast.relabel",
        description="Label saved captures again (e.g. with other labeller settings) without running Stable "
        "Diffusion: CAPTURES/<id>.safetensors + IMAGES/<id>.jpg|.jpeg|.png -> OUT/SegmentationClass/<id>.png "
        "(8-bit palette PNG, 255 = uncertain). Re-running the same command resumes where it stopped. "
        "Bad inputs are reported one line each and skipped; the exit status is then 1.",
    )
    g = p.add_argument_group("input and output")
    g.add_argument("--captures", required=True, metavar="DIR",
                   help="folder of <id>.safetensors captures (written by python -m pccfast.generate --save-captures)")
    g.add_argument("--images", required=True, metavar="DIR",
                   help="folder of the images <id>.jpg, <id>.jpeg or <id>.png (sides multiples of the capture grid)")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="output dataset folder: SegmentationClass/<id>.png (and SegmentationClassBlocky/) and labelset.json")
    g.add_argument("--save-blocky", action="store_true",
                   help="also write SegmentationClassBlocky/<id>.png: the blocky mask before refinement, at image size")
    g.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="only the first N captures, sorted by id (default: all)")
    g.add_argument("--overwrite", action="store_true",
                   help="relabel ids whose outputs exist (default: skip them, so a re-run resumes)")
    add_label_set_argument(p)
    r = p.add_argument_group("execution")
    r.add_argument("--batch", type=positive_int, default=8, metavar="N",
                   help="captures of one size per labeller call (default: %(default)s)")
    add_device_arguments(r, dtype=False)
    r.add_argument("--workers", type=int, default=2, metavar="N",
                   help="threads reading captures and images ahead of the labeller (with any, one more batches "
                   "them ahead and one writes masks behind), 0 = all in line (default: %(default)s)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from pccfast.cli.common import config_from_args, device_from_args, fail, label_set_from_args

    args = build_parser().parse_args(argv)
    try:
        label_set = label_set_from_args(args)
        cfg = config_from_args(args)
        device = device_from_args(args)
        if args.workers < 0:
            raise ValueError(f"`--workers` has to be >= 0 but is {args.workers}")
        for name in ("captures", "images"):
            d = getattr(args, name)
            if not os.path.isdir(d):
                raise ValueError(f"`--{name}` has to be a directory but {d!r} is not one")
        if not any(n.endswith(".safetensors") and not n.startswith(".") for n in os.listdir(args.captures)):
            hint = os.path.join(args.captures, "captures")
            hint = f" (did you mean {hint}?)" if os.path.isdir(hint) else ""
            raise ValueError(f"`--captures` {args.captures!r} holds no .safetensors files{hint}")
    except ValueError as e:
        fail(str(e))
    try:
        report = relabel_dir(
            args.captures, args.images, args.out, cfg, batch=args.batch, device=device, save_blocky=args.save_blocky,
            label_set=label_set, limit=args.limit, overwrite=args.overwrite, workers=args.workers,
            progress=not args.no_progress, log=lambda msg: print(f"error: {msg}", file=sys.stderr, flush=True),
        )
    except ImportError as e:
        fail(f"the labeller cannot be imported: {str(e).splitlines()[0]}")
    print(
        f"{len(report.written)} masks written, {len(report.skipped)} already done, {len(report.failures)} failed "
        f"in {report.seconds:.1f} s ({report.images_per_second:.2f} images/s) -> {args.out}",
        file=sys.stderr,
    )
    if report.failures:
        print(f"{len(report.failures)} failed:", file=sys.stderr)
        for _, msg in report.failures:
            print(f"  {msg}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
