"""Samples of the packed layouts (WebDataset tars, Parquet files) for inspect and evaluate.

The tools read a VOC dataset's files by path; a tar or parquet dataset's samples are read
through :mod:`pccfast.data.readers` (the one reader of every layout): :func:`open_packed`
lists them (small locators, no image is read), :func:`read_packed` reads them back a batch at
a time (a parquet row group once per batch), :func:`location` names where a sample is stored,
for messages and captions.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from pccfast.data.layout import PARQUET_EXT, PARQUETS, TARS, detect_layout, parse_numbered_name
from pccfast.data.readers import Encoded, Locator, Source, open_source, read_encoded

__all__ = ["PACKED", "packed_layout", "open_packed", "read_packed", "location", "stored_label_set", "DEFAULT_READ_BATCH"]

PACKED = ("webdataset", "parquet")  # the layouts whose samples are not files of their own
DEFAULT_READ_BATCH = 64  # samples read from a tar at a time (parquet: at most one row group)


def packed_layout(path: str) -> str | None:
    """``webdataset`` or ``parquet`` if the folder ``path`` holds that layout, else None (a VOC
    dataset, a plain folder, or no dataset at all)."""
    try:
        layout = detect_layout(path)
    except ValueError:
        return None
    return layout if layout in PACKED else None


def open_packed(path: str) -> Source | None:
    """The committed samples of a tar or parquet dataset ``path``; None for any other folder.
    ValueError (one line) if it is one but holds no committed sample; ImportError (one line)
    for parquet without pyarrow."""
    layout = packed_layout(path)
    if layout is None:
        return None
    source = open_source(path)
    if not source.items:
        where = TARS if layout == "webdataset" else PARQUETS
        raise ValueError(f"{path}: a {layout} dataset with no committed sample (nothing readable in {where}/)")
    return source


def read_packed(source: Source, items: Iterable[Locator], batch: int = DEFAULT_READ_BATCH,
                kinds: tuple | None = None) -> Iterator[Encoded]:
    """``items``' stored samples in the given order: tar samples ``batch`` at a time, parquet
    samples one row group at a time (consecutive items of one row group in one call: the reader
    reads the whole group, so give the items in file order). ``kinds``: only these files
    (:func:`~pccfast.data.readers.read_encoded`; default all)."""
    if batch < 1:
        raise ValueError(f"`batch` has to be >= 1 but is {batch}")
    chunk: list[Locator] = []
    for it in items:
        if chunk and (it.where[:2] != chunk[-1].where[:2] if source.layout == "parquet" else len(chunk) >= batch):
            yield from read_encoded(source, chunk, kinds)
            chunk = []
        chunk.append(it)
    if chunk:
        yield from read_encoded(source, chunk, kinds)


def location(source: Source, item: Locator, member: str = "png") -> str:
    """Where ``item`` is stored: ``PATH/shards/<tar>[<id>.<member>]`` or ``PATH/data/<file>[<id>]``."""
    if source.layout == "webdataset":
        return f"{os.path.join(source.path, TARS, item.where[0])}[{item.id}.{member}]"
    return f"{os.path.join(source.path, PARQUETS, item.where[0])}[{item.id}]"


def stored_label_set(path: str) -> dict | None:
    """The label set a parquet dataset ``path`` records in its first file's metadata (for one
    without ``labelset.json``); None for any other folder or a file that records none."""
    if packed_layout(path) != "parquet":
        return None
    from pccfast.data.parquet import parquet_label_set

    folder = os.path.join(path, PARQUETS)
    names = sorted(n for n in os.listdir(folder) if parse_numbered_name(n, PARQUET_EXT) is not None)
    return parquet_label_set(os.path.join(folder, names[0])) if names else None
