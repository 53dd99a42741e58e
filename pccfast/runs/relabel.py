"""The relabel step: saved captures (+ images) -> masks, through the same run engine as generate.

Run the labeller again on captures written by ``generate --save-captures`` (for example with
other settings) without running Stable Diffusion again. The label set is the one the captures
record unless one is given; a capture that holds its decoded image (format_version 2) is
labelled from it, so with generate's settings the masks are generate's, bit for bit; older
captures need the image files. With ``as_dataset`` the output is a complete dataset (images,
masks, train.txt, manifest.jsonl), resumed like generate's. Captures of one size go through
:func:`pccfast.core.labeller.label_images` in batches; every output file is written
atomically, the mask last, so an existing mask means the id is done and a second run skips
it (resume) unless ``overwrite``. A bad input (missing or unreadable image, an image size that
is not a multiple of the capture grid, a broken capture) is reported as one line naming the
file and the run goes on. Locally or on Ray, sharded or not: :func:`relabel_dir`.

``labeling`` (:class:`~pccfast.core.dd.LabelerChoice`) chooses the labeller: PCC (default),
Dataset Diffusion's rule (``dd``) or both fused (``fused``), from captures that hold Dataset
Diffusion's tensors (written by ``generate --labeler dd|fused`` or ``--save-all-labelers``
with ``--save-captures``); ``save_all`` also writes both labellers' own masks.

In memory there is nothing to wrap: call :func:`pccfast.core.labeller.label_images` (or
:func:`pccfast.core.dd.run_labeler`) directly.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pccfast.core.config import PCCConfig
from pccfast.core.dd import LabelerChoice, present_classes
from pccfast.core.labelset import LabelSet
from pccfast.core.seeding import SeedingCache
from pccfast.data.labelsets import get_label_set
from pccfast.data.masks import (
    DatasetStore, InputPair, MaskStore, MaskWriter, Pair, captures_label_set, find_inputs, first_without_image,
    images_folder, read_infos, read_pair,
)
from pccfast.runs.engine import Prepared, run_local
from pccfast.runs.plan import select_shard
from pccfast.runs.report import RunReport

__all__ = ["RelabelStep", "relabel_dir"]


@dataclass
class _Group:
    """Items of one size, stacked."""

    ids: list[str]
    features: torch.Tensor  # (B, D, h, w) float32
    class_attention: torch.Tensor  # (B, K, h, w) float32
    images: torch.Tensor  # (B, 3, H, W) uint8
    classes: list  # per item, its prompt's class names (Dataset Diffusion's candidates)
    dd_affinity: "torch.Tensor | None" = None  # (B, N2, N2) float32
    dd_class_attention: "torch.Tensor | None" = None  # (B, K, h4, w4) float32


@dataclass
class _Batch:
    """A prepared batch: its groups, and per id its manifest record and JPEGImages source."""

    groups: list
    records: dict  # id -> record (id, index and the capture's metadata)
    images: dict  # id -> what MaskWriter.write takes as ``image`` (None: no image file)


_RECORD_KEYS = ("prompt", "classes", "seed", "model", "steps")  # capture metadata kept in the manifest


def _record(entry: InputPair, pair: Pair) -> dict:
    """The manifest record of one item: as generate's (prompt, classes, seed, model, steps from
    the capture; height and width of the image labelled), without ``seconds``."""
    height, width = pair.image.shape[:2]
    return dict(id=entry.id, index=entry.index, **{k: pair.metadata.get(k) for k in _RECORD_KEYS},
                height=int(height), width=int(width))


def _stack_dd(pairs: list[Pair], name: str) -> "torch.Tensor | None":
    first = getattr(pairs[0], name)
    if first is None:
        return None
    out = np.empty((len(pairs),) + first.shape, first.dtype)
    for i, p in enumerate(pairs):
        np.copyto(out[i], getattr(p, name))
    return torch.from_numpy(out)


def _stack(pairs: list[Pair]) -> _Group:
    """One batch array per input (NumPy copies: torch.stack was 5-10x slower here)."""
    first = pairs[0]
    n = len(pairs)
    features = np.empty((n,) + first.features.shape, first.features.dtype)  # (B, D, h, w)
    class_attention = np.empty((n,) + first.class_attention.shape, first.class_attention.dtype)  # (B, K, h, w)
    h, w, c = first.image.shape
    images = np.empty((n, c, h, w), first.image.dtype)  # (B, 3, H, W)
    for i, p in enumerate(pairs):
        np.copyto(features[i], p.features)
        np.copyto(class_attention[i], p.class_attention)
        np.copyto(images[i], p.image.transpose(2, 0, 1))  # (3, H, W) from (H, W, 3)
    return _Group([p.id for p in pairs], torch.from_numpy(features), torch.from_numpy(class_attention),
                  torch.from_numpy(images), [list(p.metadata.get("classes") or []) for p in pairs],
                  _stack_dd(pairs, "dd_affinity"), _stack_dd(pairs, "dd_class_attention"))


class RelabelStep:
    """Reads captures (and their images), labels them on ``device``, writes their masks
    (and, when ``writer.images``, their images)."""

    name = "relabel"

    def __init__(self, cfg: PCCConfig, label_set: LabelSet, images_dir: str | None, writer: MaskWriter, *,
                 device: str = "cpu", save_blocky: bool = False, readers: int = 2,
                 labeling: LabelerChoice | None = None):
        self.cfg, self.label_set, self.images_dir, self.writer = cfg, label_set, images_dir, writer
        self.labeling = labeling or LabelerChoice()
        self.device, self.save_blocky = torch.device(device), save_blocky
        self.cache = SeedingCache()  # k-means++ draws kept across the run's batches (same results, less work)
        self.pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="pccfast-relabel-read") if readers else None

    @classmethod
    def factory(cls, cfg, label_set, images_dir, writer, *, save_blocky=False, readers=2, labeling=None):
        """``make_step(device)`` for the run engine (picklable, for Ray)."""
        return functools.partial(_build, cls, cfg, label_set, images_dir, writer, save_blocky, readers, labeling)

    def failure(self, entry: InputPair, exc: BaseException) -> str:
        first = next((x.strip() for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
        return f"{entry.capture}: labelling failed: {first}"

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, entry: InputPair):
        try:
            return read_pair(entry, self.images_dir, self.label_set)
        except ValueError as e:  # CaptureError is a ValueError
            return e

    def prepare(self, entries: list) -> Prepared:
        got = list(self.pool.map(self._read, entries)) if self.pool is not None else [self._read(e) for e in entries]
        ok, failures, by_shape, records, images = [], [], {}, {}, {}
        for entry, pair in zip(entries, got):
            if isinstance(pair, Exception):
                failures.append((entry.id, str(pair)))
                continue
            if self.labeling.needs_dd and pair.dd_affinity is None:
                failures.append((entry.id, f"{entry.capture}: holds no Dataset Diffusion tensors (dd_affinity, "
                                           f"dd_class_attention), which --labeler {self.labeling.labeler}"
                                           f"{' --save-all-labelers' if self.labeling.save_all else ''} needs; "
                                           "generate writes them with --save-captures and --labeler dd, fused or "
                                           "--save-all-labelers"))
                continue
            ok.append(entry)
            dd_key = None if pair.dd_affinity is None else (pair.dd_affinity.shape, pair.dd_class_attention.shape)
            key = (pair.features.shape, pair.class_attention.shape, pair.image.shape, dd_key)
            by_shape.setdefault(key, []).append(pair)
            records[entry.id] = _record(entry, pair)
            images[entry.id] = self.writer.dataset_image(pair)
        return Prepared(ok, _Batch([_stack(g) for g in by_shape.values()], records, images), failures)

    def process(self, prepared: Prepared) -> dict:
        from pccfast.core.dd import run_labeler

        out = {}
        d = self.device
        lab = self.labeling
        for g in prepared.data.groups:
            present = present_classes(g.classes, self.label_set, d)  # (B, K)
            res = run_labeler(lab, g.images.to(d), present, features=g.features.to(d),
                              class_attention=g.class_attention.to(d),
                              dd_affinity=None if g.dd_affinity is None else g.dd_affinity.to(d),
                              dd_class_attention=None if g.dd_class_attention is None else g.dd_class_attention.to(d),
                              cfg=self.cfg, return_blocky=self.save_blocky, cache=self.cache)
            masks = res.mask.to("cpu", torch.uint8).numpy()  # (B, H, W)
            blocky = None
            if self.save_blocky and res.blocky_full is not None:
                blocky = res.blocky_full.to("cpu", torch.uint8).numpy()  # (B, H, W)
            extra = None
            if lab.save_all:
                extra = {"mask_pcc": res.pcc.to("cpu", torch.uint8).numpy(), "mask_dd": res.dd.to("cpu", torch.uint8).numpy()}
            for i, sid in enumerate(g.ids):
                out[sid] = (masks[i], None if blocky is None else blocky[i],
                            None if extra is None else {k: v[i] for k, v in extra.items()})
        return out

    def write(self, prepared: Prepared, result: dict) -> tuple[list[dict], list]:
        records, failures = [], []
        for e in prepared.items:
            mask, blocky, extra = result[e.id]
            try:
                self.writer.write(e.id, mask, blocky, prepared.data.images[e.id], extra_masks=extra)
            except OSError as exc:
                what = "files" if self.writer.images else "mask"
                failures.append((e.id, f"{os.path.join(self.writer.out, e.id)}: cannot write its {what}: "
                                       f"{exc.strerror or exc}"))
                continue
            records.append(prepared.data.records[e.id])
        return records, failures


def _build(cls, cfg, label_set, images_dir, writer, save_blocky, readers, labeling, device):
    return cls(cfg, label_set, images_dir, writer, device=device, save_blocky=save_blocky, readers=readers,
               labeling=labeling)


def relabel_dir(
    captures: str,
    images: str | None,
    out: str,
    cfg: PCCConfig | None = None,
    *,
    batch: int = 8,
    device: "str | torch.device | None" = None,
    save_blocky: bool = False,
    label_set: "str | LabelSet | None" = None,
    as_dataset: bool = False,
    limit: int | None = None,
    overwrite: bool = False,
    workers: int = 2,
    shard: tuple[int, int] | None = None,
    ray: str | None = None,
    ray_workers: int | None = None,
    progress: bool = False,
    labeling: LabelerChoice | None = None,
) -> RunReport:
    """Label every capture in ``captures`` (with its own image, else its image from ``images``) into ``out``.

    Args:
        captures: folder of ``<id>.safetensors`` capture files.
        images: folder of ``<id>.jpg`` / ``.jpeg`` / ``.png`` images (H, W multiples of the grid),
            or a dataset folder holding ``JPEGImages/``; used for the captures that hold no image
            of their own. None: every capture to label has to hold its image.
        out: dataset folder; masks go to ``out/SegmentationClass/<id>.png`` (palette PNG).
        cfg: labeller settings (default: the reference's). Its ``ignore_index`` is taken
            from the label set.
        batch: captures per batch (captures of one size are labelled together).
        device: where to label (default: cuda if available, else cpu).
        save_blocky: also write ``out/SegmentationClassBlocky/<id>.png`` (image size).
        label_set: the label set the captures follow (name, file or LabelSet); None: the one the
            captures record (they have to agree; a ``labelset.json`` next to them gives its palette).
        as_dataset: write a complete dataset: also ``JPEGImages/<id>.jpg`` (the image file linked
            or copied when it is a JPEG, else encoded), ``ImageSets/Segmentation/train.txt`` and
            ``manifest.jsonl`` (id, index, each capture's prompt, classes, seed, model, steps, and
            the image's height and width);
            an id is done when its record, image and mask exist (generate's rule).
        limit: only the first ``limit`` captures (sorted by id).
        overwrite: relabel ids whose outputs exist (default: skip them).
        workers: threads reading inputs; with any, the next batch is read while this one is
            labelled and masks are written behind it (0: all in line).
        shard: (I, N): only the captures at positions I, I + N, ... in id order.
        ray: None runs here; "local", "auto" or an address runs on Ray with ``ray_workers``.
        progress: show the progress bar on stderr. Failures are printed as ``error:`` lines.
        labeling: the labeller (``core.dd.LabelerChoice``: pcc, dd or fused, and ``save_all``:
            also ``SegmentationClassPCC/`` and ``SegmentationClassDD/``); None: PCC. Captures
            without Dataset Diffusion's tensors fail one by one when it needs them.
    Returns:
        The :class:`~pccfast.runs.report.RunReport`; bad inputs are in ``failures``, never raised.
    Raises:
        ValueError: a folder is missing, an argument is out of range, the captures record
            different label sets, or ``images`` is None and a capture holds no image.
    """
    cfg = PCCConfig() if cfg is None else cfg
    labeling = labeling or LabelerChoice()
    if save_blocky and not labeling.needs_pcc:
        raise ValueError("`save_blocky` writes PCC's blocky mask, which --labeler dd does not make (add "
                         "--save-all-labelers to run PCC as well)")
    for name, value in (("batch", batch), ("limit", limit)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` has to be a positive int but is {value!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"`workers` has to be an int >= 0 but is {workers!r}")
    for name, d in (("captures", captures), ("images", images)):
        if d is not None and not os.path.isdir(d):
            raise ValueError(f"`{name}` has to be a directory but {d!r} is not one")
    images = None if images is None else images_folder(images)
    device = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    inputs = find_inputs(captures, images)
    infos = None
    if label_set is None:  # every capture's header (cheap): they have to agree, whichever part this run takes
        infos = dict(zip((e.id for e in inputs), read_infos(inputs)))
        ls = captures_label_set(list(infos.values()), captures) or get_label_set("voc")
    else:
        ls = get_label_set(label_set)
    if cfg.ignore_index != ls.ignore_index:
        cfg = cfg.replace(ignore_index=ls.ignore_index)
    if limit is not None:
        inputs = inputs[:limit]
    inputs = select_shard(inputs, shard)
    if images is None:
        heads = [infos[e.id] for e in inputs] if infos is not None else read_infos(inputs)
        missing = first_without_image(inputs, heads)
        if missing is not None:
            raise ValueError(f"`--images` is needed: {missing.capture} holds no image (captures written before "
                             "format_version 2 hold none); give --images with the folder of the generated images")
    if as_dataset:
        store = DatasetStore(out, ls, shard, save_blocky=save_blocky, overwrite=overwrite)
    else:
        store = MaskStore(out, ls, save_blocky=save_blocky, overwrite=overwrite)
    writer = MaskWriter(os.path.abspath(out) if ray is not None else out, ls, images=as_dataset)
    images_dir = os.path.abspath(images) if ray is not None and images is not None else images
    make_step = RelabelStep.factory(cfg, ls, images_dir, writer,
                                    save_blocky=save_blocky, readers=workers, labeling=labeling)
    if ray is None:
        return run_local(make_step, inputs, store, batch=batch, device=device, io_threads=min(workers, 1),
                         progress=progress, desc="relabel")
    from pccfast.runs.ray import run_ray

    return run_ray(make_step, inputs, store, batch=batch, device=device, address=ray, workers=ray_workers,
                   progress=progress, desc="relabel")
