"""Parquet files that Hugging Face ``datasets`` reads as an image-segmentation dataset.

Layout: ``OUT/data/<prefix>-NNNNNN.parquet`` (about ``shard_size`` rows each, in row groups of
:data:`ROW_GROUP` rows), ``OUT/manifest.jsonl`` (each record names its file as ``shard``),
``OUT/labelset.json`` and ``OUT/run.json``. One row per sample:

======== ============================== =================================================
column   Arrow type                     ``datasets`` feature
======== ============================== =================================================
id       string                         Value("string")
image    struct<bytes, path>            Image(): the JPEG bytes as generated, path <id>.jpg
mask     struct<bytes, path>            Image(): the palette PNG, 255 = uncertain
blocky   struct<bytes, path>, nullable  Image(): the 64x64 attention mask, when saved
prompt   string                         Value("string")
classes  list<string>                   List(Value("string")) (inferred)
seed     int64                          Value("int64")
model    string                         Value("string")
record   string                         Value("string"): the whole record, JSON
capture  binary, nullable               Value("binary"): the capture file, when saved
======== ============================== =================================================

The features are declared in the schema metadata under ``huggingface`` (the key ``datasets``
reads them from), so ``datasets.load_dataset("parquet", data_files="OUT/data/*.parquet")``
decodes ``image`` and ``mask`` as PIL images; the label set is in the file metadata under
``pccfast.label_set`` (and the run's defining settings under ``pccfast.run``).

Crash safety: each file is written whole (temporary file, fsync, rename) before the records of
its rows are committed; :class:`ParquetStore` repairs like the tar store (a file whose rows are
not all committed is rewritten with the committed rows, one with none is removed). Files are
written by one process (``export``). Needs pyarrow (``pip install "pccfast[parquet]"``).
"""
from __future__ import annotations

import importlib.util
import json
import os

from pccfast.core.labelset import LabelSet
from pccfast.data.fileio import atomic_write, check_id
from pccfast.data.layout import LOCATION_KEYS, PARQUET_EXT, PARQUETS, numbered_name, parse_numbered_name
from pccfast.data.shards import ShardStore

__all__ = ["ParquetWriter", "ParquetStore", "INSTALL_HINT", "ROW_GROUP", "import_pyarrow", "schema", "read_rows",
           "parquet_label_set"]

INSTALL_HINT = 'the parquet layout needs pyarrow: pip install "pccfast[parquet]" (or pip install pyarrow)'
ROW_GROUP = 64  # rows per row group: what a reader holds in memory at a time
LABEL_SET_KEY = b"pccfast.label_set"
RUN_KEY = b"pccfast.run"
_VALUE = {"id": "string", "prompt": "string", "seed": "int64", "model": "string", "record": "string",
          "capture": "binary"}
_IMAGES = ("image", "mask", "blocky")


def import_pyarrow():
    """``(pyarrow, pyarrow.parquet)``; ImportError in one line saying what to install."""
    if importlib.util.find_spec("pyarrow") is None:
        raise ImportError(INSTALL_HINT)
    import pyarrow
    import pyarrow.parquet

    return pyarrow, pyarrow.parquet


def schema(label_set: LabelSet, run: dict | None = None):
    """The Arrow schema of every file, with the ``huggingface`` features and the label set."""
    pa, _ = import_pyarrow()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    types = {"id": pa.string(), "image": image, "mask": image, "blocky": image, "prompt": pa.string(),
             "classes": pa.list_(pa.string()), "seed": pa.int64(), "model": pa.string(), "record": pa.string(),
             "capture": pa.binary()}
    features = {k: ({"_type": "Image"} if k in _IMAGES else {"dtype": _VALUE[k], "_type": "Value"})
                for k in types if k != "classes"}  # classes: inferred (its feature name differs across versions)
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode(),
            LABEL_SET_KEY: json.dumps(label_set.to_json()).encode()}
    if run is not None:
        meta[RUN_KEY] = json.dumps(run).encode()
    return pa.schema(list(types.items()), metadata=meta)


def _row(sample_id: str, files: dict, record: dict) -> dict:
    def image(key, ext):
        data = files.get(key)
        return None if data is None else {"bytes": data, "path": f"{sample_id}.{ext}"}

    clean = {k: v for k, v in record.items() if k not in LOCATION_KEYS}
    seed = clean.get("seed")
    classes = clean.get("classes")
    return dict(id=sample_id, image=image("image", "jpg"), mask=image("mask", "png"), blocky=image("blocky", "png"),
                prompt=clean.get("prompt"), classes=list(classes) if isinstance(classes, (list, tuple)) else None,
                seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None, model=clean.get("model"),
                record=json.dumps(clean, ensure_ascii=False), capture=files.get("capture"))


class ParquetWriter:
    """Writes samples as parquet files ``OUT/data/<prefix>-NNNNNN.parquet``, one file per
    :meth:`write_file` call (the caller passes about ``shard_size`` samples)."""

    def __init__(self, out: str, label_set: LabelSet, *, prefix: str = "train", run: dict | None = None):
        import_pyarrow()
        self.out, self.label_set, self.prefix, self.run = out, label_set, prefix, run

    @property
    def folder(self) -> str:
        return os.path.join(self.out, PARQUETS)

    def _next_name(self) -> str:
        os.makedirs(self.folder, exist_ok=True)
        taken = [parse_numbered_name(n, PARQUET_EXT) for n in os.listdir(self.folder)]
        number = 1 + max((p[1] for p in taken if p is not None and p[0] == self.prefix), default=-1)
        return numbered_name(self.prefix, number, PARQUET_EXT)

    def write_file(self, samples: list[tuple[str, dict, dict]]) -> list[dict]:
        """Write ``samples`` ((id, encoded files as for the tar writer, record) each) as one
        file, atomically; returns their records to commit (with ``shard``, the file's name)."""
        if not samples:
            return []
        pa, pq = import_pyarrow()
        rows = [_row(check_id(sid), files, record) for sid, files, record in samples]
        name = self._next_name()
        table = pa.Table.from_pylist(rows, schema=schema(self.label_set, self.run))
        write_table(os.path.join(self.folder, name), table)
        return [dict({k: v for k, v in record.items() if k not in LOCATION_KEYS}, shard=name)
                for _, _, record in samples]


def write_table(path: str, table) -> None:
    """One parquet file, written atomically, in row groups of :data:`ROW_GROUP` rows."""
    _, pq = import_pyarrow()
    with atomic_write(path) as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP)


def read_rows(path: str, columns: list[str] | None = None):
    """The rows of a parquet file as dicts, one row group at a time (memory: one row group)."""
    _, pq = import_pyarrow()
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        yield from pf.read_row_group(i, columns=columns).to_pylist()


def parquet_label_set(path: str) -> dict | None:
    """The label set (JSON object) stored in a parquet file's metadata, or None."""
    _, pq = import_pyarrow()
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[LABEL_SET_KEY]) if LABEL_SET_KEY in meta else None


class ParquetStore(ShardStore):
    """Resume, plan and commit of a parquet dataset ``out`` (the tar store's scheme, with
    parquet files: see the module docstring)."""

    folder_name = PARQUETS
    ext = PARQUET_EXT

    def __init__(self, *args, **kwargs):
        import_pyarrow()
        super().__init__(*args, **kwargs)

    def write_plan(self, ids: list[str]) -> None:
        super(ShardStore, self).write_plan(ids)  # ids may hold dots here

    def repair_file(self, path: str, keep: set[str]) -> list[str]:
        pa, pq = import_pyarrow()
        try:
            ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()  # the ids only: no image is read
        except (OSError, pa.ArrowInvalid, KeyError):  # not a whole parquet file (cannot happen with atomic writes)
            os.unlink(path)
            return []
        last = {sid: i for i, sid in enumerate(ids)}
        rows = [i for i, sid in enumerate(ids) if sid in keep and last[sid] == i]
        if not rows:
            os.unlink(path)
            return []
        if len(rows) < len(ids):  # rare (a kill between a file's manifest lines): rewrite it
            write_table(path, pq.read_table(path).take(pa.array(rows)))
        return [ids[i] for i in rows]

    def verified_files(self) -> dict:
        return {}  # no index: each file's ids are read (one column) when the store opens

    def write_index(self, records: list[dict]) -> None:
        return None  # the files hold their own row counts
