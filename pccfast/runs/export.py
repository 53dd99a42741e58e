"""The export step: a dataset in one layout -> the same samples in another (VOC, webdataset, parquet).

Streaming: the source is listed as small locators (:func:`pccfast.data.readers.open_source`)
and read a batch at a time on the engine's prepare thread; each batch is written by the
target's writer and committed to its store, so an interrupted export resumes where it stopped
(running the same command again), and memory stays flat in the dataset size. Files are
copied byte for byte: JPEG images are not re-encoded, masks stay the same PNG bytes, records
stay the same records (the target adds only where it stored a sample, ``shard``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pccfast.core.labelset import LabelSet, as_label_set, label_set_from_dict
from pccfast.data.fileio import check_id
from pccfast.data.layout import FORMATS, LABELSET, LOCATION_KEYS, file_prefix
from pccfast.data.manifest import Manifest
from pccfast.data.readers import Source, committed_records, open_source, read_encoded
from pccfast.data.shards import DEFAULT_SHARD_SIZE, ShardStore, ShardWriter, check_format
from pccfast.data.writer import SampleWriter
from pccfast.runs.engine import Prepared, one_line, run_local
from pccfast.runs.report import RunReport

__all__ = ["ExportStep", "run_export", "DEFAULT_BATCH"]

DEFAULT_BATCH = 64  # samples read and written per batch (parquet: one file, --shard-size rows)


@dataclass
class ExportStep:
    """Reads a batch of ``source``'s samples (``prepare``) and writes them with ``writer``
    (a :class:`SampleWriter`, :class:`ShardWriter` or ``ParquetWriter``) in layout ``to``."""

    source: Source
    to: str
    writer: object
    name: str = "export"

    def prepare(self, items: list) -> Prepared:
        try:
            return Prepared(list(items), read_encoded(self.source, items))
        except (OSError, ValueError, KeyError):
            pass  # one bad sample: read them one by one, so the others still go
        ok, data, failures = [], [], []
        for it in items:
            try:
                data += read_encoded(self.source, [it])
                ok.append(it)
            except (OSError, ValueError, KeyError) as exc:
                failures.append((it.id, f"{it.id}: cannot read it from {self.source.path}: {one_line(exc)}"))
        return Prepared(ok, data, failures)

    def process(self, prepared: Prepared) -> list:
        return prepared.data  # nothing to compute: the bytes go as they are

    def write(self, prepared: Prepared, samples: list) -> tuple[list[dict], list]:
        records = [dict(s.record, id=s.id) for s in samples]
        if self.to == "parquet":
            return self.writer.write_file([(s.id, s.files, r) for s, r in zip(samples, records)]), []
        written, failures = [], []
        try:
            for s, r in zip(samples, records):
                try:
                    if self.to == "voc":
                        self.writer.write_encoded(s.id, s.files)
                        written.append(r)
                    else:
                        written.append(self.writer.write_encoded(s.id, s.files, r))
                except (OSError, ValueError) as exc:
                    failures.append((s.id, f"cannot write {s.id} into {self.writer.out}: {one_line(exc)}"))
        finally:
            if self.to == "webdataset":
                self.writer.end_batch()  # before the driver commits the batch
        return written, failures

    def close(self) -> None:
        close = getattr(self.writer, "close", None)
        if close is not None:
            close()


def _label_set(source: Source) -> LabelSet:
    if source.label_set is None:
        return as_label_set("voc")  # a plain VOC folder without labelset.json
    return label_set_from_dict(source.label_set, os.path.join(source.path, LABELSET))


def _same_folder(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def run_export(src: str, to: str, out: str, *, shard_size: int = DEFAULT_SHARD_SIZE, batch: int = DEFAULT_BATCH,
               overwrite: bool = False, progress: bool = True, io_threads: int = 1) -> RunReport:
    """Export dataset ``src`` (any layout) into ``out`` in layout ``to`` (one of
    :data:`~pccfast.data.layout.FORMATS`).

    Args:
        shard_size: samples per tar (webdataset) or rows per file (parquet; also the batch).
        batch: samples read and written per batch (voc, webdataset).
        overwrite: redo samples of ``out`` whose records differ from ``src``'s instead of refusing.
        progress: show the progress bar.
        io_threads: 0 reads and writes in line; 1 reads the next batch while one is written.
    Raises:
        ValueError: a bad ``to``, ``shard_size`` or ``batch``, ``src`` not a dataset, ``out``
            the same folder or one made from other samples (one line each).
    """
    if to not in FORMATS:
        raise ValueError(f"`--to` has to be one of {', '.join(FORMATS)} but is {to!r}")
    for name, value in (("shard_size", shard_size), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` has to be a positive int but is {value!r}")
    source = open_source(src)
    if _same_folder(src, out):
        raise ValueError(f"{out}: is the source dataset; export into another folder")
    check_format(out, to)
    label_set = _label_set(source)
    defining = (source.run or {}).get("defining")
    committed = committed_records(src) or {}
    expected = {sid: {k: v for k, v in r.items() if k not in LOCATION_KEYS} for sid, r in committed.items()}
    prefix = file_prefix(None)
    if to == "voc":
        store = Manifest(out, label_set, defining=defining, expected=expected, overwrite=overwrite)
        writer = SampleWriter(out, label_set)
    elif to == "webdataset":
        store = ShardStore(out, label_set, defining=defining, expected=expected, overwrite=overwrite)
        writer = ShardWriter(out, label_set, shard_size=shard_size, prefix=prefix)
    else:
        from pccfast.data.parquet import ParquetStore, ParquetWriter

        store = ParquetStore(out, label_set, defining=defining, expected=expected, overwrite=overwrite)
        writer = ParquetWriter(out, label_set, prefix=prefix, run=source.run)
        batch = shard_size  # one file per batch: a file is whole before its rows are committed
    for it in source.items:
        check_id(it.id)
    step = ExportStep(source, to, writer)
    return run_local(lambda device: step, source.items, store, batch=batch, io_threads=io_threads,
                     progress=progress, desc="export")

