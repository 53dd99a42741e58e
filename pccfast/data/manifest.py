"""The driver's side of a dataset: what is done (resume), the shard plan, the commit point.

A sample's files are written first (each atomically, by :class:`~pccfast.data.writer.SampleWriter`);
its manifest line is appended last and is the commit point: an id counts as done only when
its manifest line exists and its image and mask files are present. A run killed at any
moment therefore loses at most the samples in flight and leaves no truncated file. Sharded
runs (``--shard I/N``) append to ``manifests/shard-I-of-N.jsonl`` and record their planned ids
in ``manifests/shard-I-of-N.plan``; :func:`pccfast.data.merge.merge_datasets` rebuilds
``manifest.jsonl`` and ``train.txt`` from them.
"""
from __future__ import annotations

import errno
import json
import os

from pccfast.core.labelset import LabelSet
from pccfast.data.fileio import append_line, atomic_write_bytes, check_writable, clean_stale_temps, read_jsonl
from pccfast.data.labelsets import check_label_set_file, ensure_label_set_file
from pccfast.data.provenance import OVERWRITE_HINT, check_run_file, first_difference, write_run_file
from pccfast.data.layout import IMAGES, MANIFEST, MASKS, SHARDS, SPLIT, output_dirs, sample_paths, shard_manifest, shard_plan

__all__ = ["Manifest", "check_output_folder", "make_output_folder", "dedup_records", "record_order", "write_split", "all_records"]


def dedup_records(records: list[dict]) -> list[dict]:
    """Last record per id wins; order of first appearance kept."""
    by_id: dict[str, dict] = {}
    for r in records:
        if "id" in r:
            r["id"] = str(r["id"])
            by_id[r["id"]] = r
    return list(by_id.values())


def record_order(r: dict):
    """Sort key: prompt order (``index``), not completion order (Ray workers finish out of order)."""
    idx = r.get("index")
    return (0, idx, "") if isinstance(idx, int) else (1, 0, str(r["id"]))


def write_split(out: str, ids: list[str]) -> None:
    atomic_write_bytes(os.path.join(out, SPLIT), "".join(f"{i}\n" for i in ids).encode())


def all_records(out: str) -> list[dict]:
    """Every manifest record of dataset ``out``: ``manifest.jsonl`` and each shard's manifest."""
    records = read_jsonl(os.path.join(out, MANIFEST))
    shard_dir = os.path.join(out, SHARDS)
    if os.path.isdir(shard_dir):
        for name in sorted(os.listdir(shard_dir)):
            if name.endswith(".jsonl"):
                records += read_jsonl(os.path.join(shard_dir, name))
    return records


def check_output_folder(out: str, label_set: LabelSet) -> None:
    """Read-only checks of an output dataset folder before a run: not a file, and its
    ``labelset.json`` (if any) names ``label_set``; OSError or ValueError in one line."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a dataset folder", out)
    check_label_set_file(out, label_set)


def make_output_folder(out: str, label_set: LabelSet, folders, temp_dirs) -> None:
    """After the checks: prove ``out`` writable (one line if not), make ``folders`` in it,
    write ``labelset.json`` and remove what killed writers of this host left in ``temp_dirs``."""
    check_writable(out)
    for name in folders:
        os.makedirs(os.path.join(out, name), exist_ok=True)
    ensure_label_set_file(out, label_set)
    for d in temp_dirs:
        clean_stale_temps(d)


class Manifest:
    """Resume, plan and commit for a generated dataset ``out``; ``shard`` = (I, N) or None.

    Args:
        defining: the run's defining settings (see :mod:`pccfast.data.provenance`), checked
            against ``run.json`` and written there; None: no provenance (e.g. tests, merge).
        expected: id -> the record fields that define that sample (prompt, classes, seed,
            size, ...); a finished sample whose record differs is refused, or redone with
            ``overwrite``.
        overwrite: redo the samples whose records differ instead of refusing the run.

    Everything is checked before anything is written (label set, ``run.json``, the records,
    that ``out`` can be written); then the output folders are made, ``labelset.json`` and
    ``run.json`` written, and temporary files that killed writers of this host left removed.
    """

    def __init__(self, out: str, label_set: LabelSet, shard: tuple[int, int] | None = None, *,
                 defining: dict | None = None, expected: dict | None = None, overwrite: bool = False):
        self.out, self.label_set, self.shard = out, label_set, shard
        self.overwrite = overwrite
        check_output_folder(out, label_set)
        if defining is not None:
            check_run_file(out, defining, overwrite=overwrite)
        self.stale = self._differing(expected or {})  # finished ids that this run makes otherwise
        make_output_folder(out, label_set, (IMAGES, MASKS), output_dirs(out))
        if defining is not None:
            write_run_file(out, defining)

    def _differing(self, expected: dict) -> set[str]:
        """Finished ids whose record differs from ``expected``: refused (ValueError naming the
        first id, field and both values) unless ``overwrite``, which redoes them."""
        if not expected or not os.path.isdir(self.out):
            return set()
        stale = set()
        for r in dedup_records(all_records(self.out)):
            want = expected.get(r["id"])
            diff = None if want is None else first_difference(r, want)
            if diff is None:
                continue
            if not self.overwrite:
                key, old, new = diff
                raise ValueError(f"{os.path.join(self.out, MANIFEST)}: sample {r['id']} was made with {key} {old!r} "
                                 f"but this run has {new!r}: {OVERWRITE_HINT}")
            stale.add(r["id"])
        return stale

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.out, MANIFEST) if self.shard is None else shard_manifest(self.out, self.shard)

    def done_ids(self) -> set[str]:
        """Ids whose manifest record exists (in any manifest of this dataset) and whose files are there."""
        done = set()
        for r in all_records(self.out):
            sid = str(r.get("id"))
            p = sample_paths(self.out, sid)
            if sid not in self.stale and os.path.exists(p["image"]) and os.path.exists(p["mask"]):
                done.add(sid)
        return done

    def write_plan(self, ids: list[str]) -> None:
        """Sharded runs record the ids they are responsible for (merge reports gaps from it)."""
        if self.shard is not None:
            atomic_write_bytes(shard_plan(self.out, self.shard), ("\n".join(ids) + "\n").encode())

    def paths(self, sample_id: str) -> list[str]:
        """Every file a sample may have (a dead worker's temporaries for them are removed)."""
        return list(sample_paths(self.out, sample_id).values())

    def commit(self, record: dict) -> None:
        """Append a finished sample's manifest record (the commit point)."""
        append_line(self.manifest_path, json.dumps(record, ensure_ascii=False))

    def finalize(self) -> list[str]:
        """Rewrite train.txt from the done ids (unsharded runs); returns the ids."""
        if self.shard is not None:
            return []
        records = sorted(dedup_records(read_jsonl(os.path.join(self.out, MANIFEST))), key=record_order)
        ids = [r["id"] for r in records if os.path.exists(sample_paths(self.out, r["id"])["mask"])]
        write_split(self.out, ids)
        return ids
