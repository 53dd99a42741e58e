"""Reading any pccfast dataset back: VOC folders, WebDataset tars or Parquet files.

:func:`load_dataset` is the one-liner for users' scripts::

    from pccfast.data import load_dataset

    for image, mask, record in load_dataset("OUT"):   # (H, W, 3) uint8, (H, W) uint8, dict
        ...

The lower level, used by ``export``: :func:`open_source` lists a dataset's samples as small
:class:`Locator` objects (an id, a position and where its bytes are: memory stays flat in the
dataset size, no image is read), and :func:`read_encoded` reads a batch of them as
:class:`Encoded` samples, the files' bytes exactly as stored. Only committed samples are
listed (those in the manifest, when the dataset has one), in the manifest's order for VOC and
in file order for tars and parquet files; records come without the layout's own fields
(:data:`~pccfast.data.layout.LOCATION_KEYS`).
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pccfast.data.fileio import load_image, load_mask
from pccfast.data.layout import (LABELSET, LOCATION_KEYS, MANIFEST, MASKS, MEMBERS, PARQUET_EXT, PARQUETS, RUN_FILE,
                                 SPLIT, TAR_EXT, TARS, detect_layout, parse_numbered_name, sample_paths)
from pccfast.data.manifest import all_records, dedup_records, record_order

__all__ = ["Locator", "Encoded", "Source", "open_source", "read_encoded", "iter_encoded", "load_dataset",
           "committed_records"]

_KIND = {ext: kind for kind, ext in MEMBERS.items()}  # tar member extension -> file kind


@dataclass(frozen=True)
class Locator:
    """One sample of a source: ``id``, ``index`` (its position in the source's order) and
    ``where`` its bytes are (layout-specific: nothing for VOC, the tar and member spans, or
    the parquet file, row group and row)."""

    id: str
    index: int
    where: tuple = ()


@dataclass
class Encoded:
    """One sample as stored: ``files`` maps ``image`` (JPEG), ``mask`` (palette PNG) and, when
    there, ``blocky`` and ``capture`` to their bytes; ``record`` is its manifest record."""

    id: str
    record: dict
    files: dict = field(default_factory=dict)


@dataclass
class Source:
    """A dataset opened for reading: its ``layout``, folder, label set (JSON object or None),
    run file (JSON object or None) and its committed samples."""

    path: str
    layout: str
    label_set: dict | None
    run: dict | None
    items: list
    records: dict = field(default_factory=dict)  # VOC: id -> its committed record


def _json_file(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    return value if isinstance(value, dict) else None


def committed_records(path: str) -> dict[str, dict] | None:
    """id -> last committed record of every manifest of ``path``; None if it has no manifest."""
    if not os.path.exists(os.path.join(path, MANIFEST)) and not all_records(path):
        return None
    return {r["id"]: r for r in dedup_records(all_records(path))}


def open_source(path: str) -> Source:
    """List the committed samples of dataset ``path`` (VOC, webdataset or parquet layout,
    :func:`~pccfast.data.layout.detect_layout`); ValueError (one line) if it is none."""
    layout = detect_layout(path)
    label_set, run = _json_file(os.path.join(path, LABELSET)), _json_file(os.path.join(path, RUN_FILE))
    committed = committed_records(path)
    records = {}
    if layout == "voc":
        items, records = _voc_items(path, committed), committed or {}
    elif layout == "webdataset":
        items = _tar_items(path, committed)
    else:
        items = _parquet_items(path, committed)
        if label_set is None and items:
            from pccfast.data.parquet import parquet_label_set

            label_set = parquet_label_set(os.path.join(path, PARQUETS, items[0].where[0]))
    return Source(path, layout, label_set, run, items, records)


def _voc_items(path: str, committed: dict | None) -> list[Locator]:
    if committed is not None:
        ids = [r["id"] for r in sorted(committed.values(), key=record_order)]
    elif os.path.isfile(os.path.join(path, SPLIT)):
        with open(os.path.join(path, SPLIT), encoding="utf-8") as f:
            ids = [x.strip() for x in f if x.strip()]
    else:
        ids = sorted(n[:-4] for n in os.listdir(os.path.join(path, MASKS)) if n.endswith(".png"))
    ids = [i for i in ids if all(os.path.exists(sample_paths(path, i)[k]) for k in ("image", "mask"))]
    return [Locator(sid, i) for i, sid in enumerate(ids)]


def _numbered(folder: str, ext: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if parse_numbered_name(n, ext) is not None)


def _tar_items(path: str, committed: dict | None) -> list[Locator]:
    from pccfast.data.shards import group_samples, read_members

    items = []
    for name in _numbered(os.path.join(path, TARS), TAR_EXT):
        for key, members in group_samples(read_members(os.path.join(path, TARS, name))):
            if committed is not None and committed.get(key, {}).get("shard") != name:
                continue  # not committed (a crashed run not yet resumed), or committed elsewhere
            spans = tuple((m.ext, m.data, m.size) for m in members)
            if {"jpg", "png"} <= {ext for ext, _, _ in spans}:
                items.append(Locator(key, len(items), (name, spans)))
    return items


def _parquet_items(path: str, committed: dict | None) -> list[Locator]:
    from pccfast.data.parquet import import_pyarrow

    _, pq = import_pyarrow()
    items = []
    for name in _numbered(os.path.join(path, PARQUETS), PARQUET_EXT):
        pf = pq.ParquetFile(os.path.join(path, PARQUETS, name))
        for g in range(pf.num_row_groups):
            for row, sid in enumerate(pf.read_row_group(g, columns=["id"]).column("id").to_pylist()):
                if committed is None or committed.get(sid, {}).get("shard") == name:
                    items.append(Locator(sid, len(items), (name, g, row)))
    return items


def _clean(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in LOCATION_KEYS}


_FILES = ("image", "mask", "blocky", "capture")


def read_encoded(source: Source, items: list[Locator], kinds: tuple | None = None) -> list[Encoded]:
    """The stored bytes and records of ``items`` (of ``source``), in their order; ``kinds``: only
    these of its files (of ``image``, ``mask``, ``blocky``, ``capture``; default all), so that,
    for example, counting mask labels reads no capture (parquet: not even its column)."""
    kinds = _FILES if kinds is None else tuple(kinds)
    bad = [k for k in kinds if k not in _FILES]
    if bad:
        raise ValueError(f"`kinds` has to name files of {list(_FILES)} but names {bad}")
    if source.layout == "voc":
        return [_read_voc(source, it, kinds) for it in items]
    if source.layout == "webdataset":
        return _read_tars(source, items, kinds)
    return _read_parquet(source, items, kinds)


def _read_voc(source: Source, item: Locator, kinds: tuple = _FILES) -> Encoded:
    p = sample_paths(source.path, item.id)
    files = {}
    for key in kinds:
        if key in ("image", "mask") or os.path.exists(p[key]):
            with open(p[key], "rb") as f:
                files[key] = f.read()
    return Encoded(item.id, _clean(source.records.get(item.id, {"id": item.id})), files)


def _read_tars(source: Source, items: list[Locator], kinds: tuple = _FILES) -> list[Encoded]:
    out, handles = [], {}
    try:
        for it in items:
            name, spans = it.where
            if name not in handles:
                handles[name] = open(os.path.join(source.path, TARS, name), "rb")
            f, files, record = handles[name], {}, None
            for ext, start, size in spans:
                if ext != "json" and _KIND.get(ext) not in kinds:
                    continue
                f.seek(start)
                data = f.read(size)
                if ext == "json":
                    record = json.loads(data)
                elif ext in _KIND:
                    files[_KIND[ext]] = data
            out.append(Encoded(it.id, _clean(record if isinstance(record, dict) else {"id": it.id}), files))
    finally:
        for f in handles.values():
            f.close()
    return out


def _read_parquet(source: Source, items: list[Locator], kinds: tuple = _FILES) -> list[Encoded]:
    from pccfast.data.parquet import import_pyarrow

    _, pq = import_pyarrow()
    groups: dict[tuple[str, int], list] = {}
    out = []
    for it in items:
        name, g, row = it.where
        if (name, g) not in groups:
            groups.clear()  # one row group in memory at a time (items come in file order)
            pf = pq.ParquetFile(os.path.join(source.path, PARQUETS, name))
            columns = None if kinds == _FILES else [c for c in pf.schema_arrow.names if c not in _FILES or c in kinds]
            groups[(name, g)] = pf.read_row_group(g, columns=columns).to_pylist()
        r = groups[(name, g)][row]
        files = {k: r[k]["bytes"] for k in ("image", "mask", "blocky") if r.get(k) and r[k].get("bytes") is not None}
        if r.get("capture") is not None:
            files["capture"] = r["capture"]
        record = json.loads(r["record"]) if r.get("record") else {
            k: r.get(k) for k in ("id", "prompt", "classes", "seed", "model") if r.get(k) is not None}
        out.append(Encoded(it.id, _clean(record), files))
    return out


def iter_encoded(path: str, batch: int = 64) -> Iterator[Encoded]:
    """Every committed sample of dataset ``path``, as stored, ``batch`` at a time from disk."""
    source = open_source(path)
    for i in range(0, len(source.items), batch):
        yield from read_encoded(source, source.items[i : i + batch])


def load_dataset(path: str) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """Yield ``(image, mask, record)`` for every sample of dataset ``path``, whatever its
    layout: image (H, W, 3) uint8 RGB, mask (H, W) uint8 labels (255 = uncertain), record the
    manifest record (id, prompt, classes, seed, model, ...)."""
    for s in iter_encoded(path):
        yield load_image(io.BytesIO(s.files["image"])), load_mask(io.BytesIO(s.files["mask"])), s.record
