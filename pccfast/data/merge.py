"""One dataset from what sharded runs wrote: rebuild ``manifest.jsonl`` and ``train.txt``, report gaps.

A merge first reads and checks everything and only then writes: inputs that are not datasets,
an ``--out`` that is a file or one of several inputs, label sets or defining run settings
(``run.json``, see :mod:`pccfast.data.provenance`) that differ, and ids with different records in two inputs are refused before any file is
touched. Records compare on every field except timings (keys named ``seconds``), so the same
sample reached twice (a shared folder, a re-run shard) is merged once.

WebDataset datasets (``generate --format webdataset``) merge the same way: a record is complete
when the tar it names holds its sample; the merge writes ``manifest.jsonl`` and the shard
index ``shards.json`` (no ``train.txt``). In place the tars stay as the shard runs left them
(each run repairs its own); into ``--out`` each tar is hard-linked (or copied), or copied
without the samples that did not make it into the merge, and renamed if two inputs used one
name; tars of an earlier merge into ``--out`` that no record names are removed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from pccfast.data.fileio import atomic_link_or_copy, atomic_write_bytes, check_id, check_writable, read_jsonl
from pccfast.data.layout import (LABELSET, MANIFEST, RUN_FILE, SHARDS, TAR_EXT, TARS, detect_layout, numbered_name,
                                 parse_numbered_name, parse_shard_file, sample_paths)
from pccfast.data.manifest import dedup_records, record_order, write_split
from pccfast.data.provenance import first_difference

__all__ = ["MergeReport", "merge_datasets", "ON_CONFLICT"]

ON_CONFLICT = ("fail", "keep-first")  # what to do with an id that has different records in two inputs
_TIMING = "seconds"  # record keys left out when records are compared
_SHOWN = 5  # clashing ids named in an error line


@dataclass
class MergeReport:
    ids: list[str] = field(default_factory=list)  # ids in the merged train.txt
    missing: list[str] = field(default_factory=list)  # planned by a shard but not finished
    missing_shards: list[str] = field(default_factory=list)  # "I/N" with no plan file at all
    incomplete: list[str] = field(default_factory=list)  # manifest record without its files
    missing_by_shard: dict[str, list[str]] = field(default_factory=dict)  # "I/N" -> its missing ids
    dropped: dict[str, list[str]] = field(default_factory=dict)  # keep-first: id -> inputs whose other record was dropped
    layout: str = "voc"  # of the inputs: voc or webdataset


@dataclass
class _Source:
    """One manifest file of one input: its records by id (last per id within the file)."""
    dir: str  # the input directory
    path: str  # the manifest file
    records: list[dict]


def merge_datasets(dirs: list[str], out: str | None = None, *, on_conflict: str = "fail") -> MergeReport:
    """Rebuild ``manifest.jsonl`` and ``train.txt`` from what shards wrote.

    With one directory (shards wrote into a shared folder) the merge is in place; with several,
    their files are copied into ``out`` (hard links where possible). Gaps (planned ids with no
    finished sample, shards that never started) are reported, not invented. An id with
    different records in two inputs is a ValueError (``on_conflict="fail"``) or keeps the
    first input's record and files (``"keep-first"``, the others listed in ``report.dropped``).
    Every check runs before anything is written; I/O failures raise ``OSError``.
    """
    target = _check_dirs(dirs, out, on_conflict)
    tars = _layout_tars(dirs)  # webdataset inputs: dir -> tar name -> the keys it holds; None for VOC
    outside = [] if any(_same_path(target, d) for d in dirs) else [target]  # an existing --out is checked too
    labelset = _agreed_file(dirs + outside, LABELSET, _labelset_difference)
    run = _agreed_file(dirs + outside, RUN_FILE, _run_difference, "defining")
    sources, planned, counts = [], {}, set()
    for d in dirs:
        sources += _read_sources(d)
        planned.update(_read_plans(d, counts))
    report = MergeReport(layout="voc" if tars is None else "webdataset")
    merged = _resolve(sources, on_conflict, report)
    report.missing_shards = [f"{i}/{n}" for n in sorted(counts) for i in range(n) if f"{i}/{n}" not in planned]
    final = []
    for r, src_dir in sorted(merged, key=lambda rd: record_order(rd[0])):
        src = sample_paths(src_dir, r["id"])
        if tars is not None:
            complete = r["id"] in tars[src_dir].get(str(r.get("shard")), ())
        else:
            complete = os.path.exists(src["image"]) and os.path.exists(src["mask"])
        if complete:
            final.append((r, src_dir))
        else:
            report.incomplete.append(r["id"])
    done = {r["id"] for r, _ in final}
    for key, ids in planned.items():
        gap = [i for i in ids if i not in done]
        if gap:
            report.missing_by_shard[key] = gap
        report.missing += gap
    if not merged:  # no record at all: leave every folder as it is (the caller says "no finished samples")
        return report
    # every check has passed: write
    check_writable(target)  # a read-only or full --out fails here, before a first file
    elsewhere = {d for d in dirs if not _same_path(d, target)}
    placed: set[str] = set()
    if tars is not None:
        final, placed = _place_tars(final, elsewhere, target)
    for r, src_dir in final if tars is None else ():
        if src_dir in elsewhere:
            src, dst = sample_paths(src_dir, r["id"]), sample_paths(target, r["id"])
            for key in ("image", "mask", "blocky", "capture"):
                if os.path.exists(src[key]):
                    atomic_link_or_copy(src[key], dst[key])
    for name, found in ((LABELSET, labelset), (RUN_FILE, run)):
        if found is not None and not _same_path(found[0], os.path.join(target, name)):
            atomic_write_bytes(os.path.join(target, name), found[1])
    atomic_write_bytes(
        os.path.join(target, MANIFEST), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r, _ in final).encode()
    )
    report.ids = [r["id"] for r, _ in final]
    if tars is None:
        write_split(target, report.ids)
    else:
        from pccfast.data.shards import write_index

        write_index(target, [r for r, _ in final], verified=placed)
    return report


def _layout_tars(dirs: list[str]) -> dict | None:
    """None if the inputs are VOC datasets; for webdataset inputs, dir -> tar -> keys it holds.
    ValueError for parquet inputs or a mix of layouts."""
    layouts = {}
    for d in dirs:
        try:
            layouts[d] = detect_layout(d)
        except ValueError:
            layouts[d] = "voc"  # a shard folder with no sample yet
    if "parquet" in layouts.values():
        d = next(d for d, lay in layouts.items() if lay == "parquet")
        raise ValueError(f"{d}: a parquet dataset; merge reads voc and webdataset datasets (export parquet from the "
                         "merged one)")
    if len(set(layouts.values())) > 1:
        raise ValueError(f"{', '.join(dirs)}: mix voc and webdataset datasets; merge inputs of one layout "
                         "(python -m pccfast.export converts)")
    if "webdataset" not in layouts.values():
        return None
    from pccfast.data.shards import group_samples, read_members

    found = {}
    for d in dirs:
        folder = os.path.join(d, TARS)
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        names = [n for n in names if parse_numbered_name(n, TAR_EXT)]
        found[d] = {n: {k for k, _ in group_samples(read_members(os.path.join(folder, n)))} for n in names}
    return found


def _place_tars(final: list, elsewhere: set, target: str) -> tuple[list, set]:
    """Link or copy the tars of inputs other than ``target`` into it (without the samples the
    merge left out; renamed where two inputs used one name), remove ``target``'s tars that no
    record names, and return the records with their tar names in ``target`` and the names of
    the tars placed (each holds exactly its records' samples)."""
    from pccfast.data.shards import copy_tar

    groups: dict[tuple[str, str], set] = {}
    for r, d in final:
        if d in elsewhere:
            groups.setdefault((d, str(r["shard"])), set()).add(r["id"])
    names, taken = {}, {str(r["shard"]) for r, d in final if d not in elsewhere}
    for d, name in sorted(groups):
        new = name
        if new in taken:
            prefix, _ = parse_numbered_name(name, TAR_EXT)
            number = 1 + max((p[1] for p in map(lambda n: parse_numbered_name(n, TAR_EXT), taken | {name})
                              if p is not None and p[0] == prefix), default=-1)
            new = numbered_name(prefix, number, TAR_EXT)
        taken.add(new)
        names[(d, name)] = new
        os.makedirs(os.path.join(target, TARS), exist_ok=True)
        copy_tar(os.path.join(d, TARS, name), os.path.join(target, TARS, new), groups[(d, name)])
    folder = os.path.join(target, TARS)
    if os.path.isdir(folder) and elsewhere:
        for n in os.listdir(folder):
            if parse_numbered_name(n, TAR_EXT) and n not in taken:
                os.unlink(os.path.join(folder, n))  # an earlier merge's: its samples are in the tars above
    records = [(dict(r, shard=names[(d, str(r["shard"]))]) if d in elsewhere else r, d) for r, d in final]
    return records, set(names.values())


def _check_dirs(dirs: list[str], out: str | None, on_conflict: str) -> str:
    """The folder written into; ValueError for inputs that are not datasets and for a bad ``out``."""
    if on_conflict not in ON_CONFLICT:
        raise ValueError(f"`on_conflict` has to be one of {', '.join(ON_CONFLICT)} but is {on_conflict!r}")
    if not dirs:
        raise ValueError("`dirs` has to name at least one dataset directory but is empty")
    for d in dirs:
        if not os.path.isdir(d):
            raise ValueError(f"{d}: not a dataset directory (no such directory)")
        if not any(os.path.exists(os.path.join(d, name)) for name in (MANIFEST, SHARDS, LABELSET)):
            raise ValueError(f"{d}: not a dataset directory (no {MANIFEST}, {SHARDS}/ or {LABELSET})")
    if len(dirs) > 1 and out is None:
        raise ValueError("merging several directories needs `out` (--out DIR)")
    if out is not None and os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file, not a directory")
    if out is not None and len(dirs) > 1 and any(_same_path(out, d) for d in dirs):
        raise ValueError(f"--out {out}: is one of the input directories; merge several directories into a new folder")
    return out or dirs[0]


def _same_path(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _agreed_file(dirs: list[str], name: str, difference, inner: str | None = None) -> tuple[str, bytes] | None:
    """The first ``name`` (path, bytes) among ``dirs``; ValueError if another one differs from it
    (``difference(first_path, first, path, this)`` is that error's text, or None), or if one is
    not a JSON object (with an object under key ``inner``)."""
    first = None
    for d in dirs:
        path = os.path.join(d, name)
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            raw = f.read()
        try:
            value = json.loads(raw)
        except ValueError:
            raise ValueError(f"{path}: not a JSON file") from None
        if not isinstance(value, dict) or (inner is not None and not isinstance(value.get(inner), dict)):
            raise ValueError(f"{path}: has to be a JSON object{f' with a {inner!r} object' if inner else ''}")
        if first is None:
            first = (path, raw, value)
        elif (why := difference(first[0], first[2], path, value)) is not None:
            raise ValueError(why)
    return None if first is None else first[:2]


def _labelset_difference(first_path: str, first: dict, path: str, this: dict) -> str | None:
    if this.get("classes") == first.get("classes"):
        return None
    return (f"{path}: label set {this.get('name')!r} differs from the other directories' ({first.get('name')!r} in "
            f"{first_path}); one dataset has one label set")


def _run_difference(first_path: str, first: dict, path: str, this: dict) -> str | None:
    diff = first_difference(first["defining"], this["defining"], list(first["defining"]))
    if diff is None:  # versions and the time written are informative, not compared
        return None
    key, old, new = diff
    return (f"{path}: the samples were made with {key} {_short(new)} but those of {first_path} with {_short(old)}; "
            "samples made with other settings are not one dataset")


def _short(value, width: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


def _comparable(value):
    """``value`` without timing keys (``seconds``), at any depth."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k != _TIMING}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _read_sources(d: str) -> list[_Source]:
    """The manifest files of input ``d``: ``manifest.jsonl``, then each shard's, in name order."""
    paths = [os.path.join(d, MANIFEST)]
    sd = os.path.join(d, SHARDS)
    if os.path.isdir(sd):
        paths += [os.path.join(sd, name) for name in sorted(os.listdir(sd)) if name.endswith(".jsonl")]
    sources = []
    for path in paths:
        records = dedup_records([r for r in read_jsonl(path) if isinstance(r, dict)])
        for r in records:
            try:
                check_id(r["id"])
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
        sources.append(_Source(d, path, records))
    return sources


def _read_plans(d: str, counts: set[int]) -> dict[str, list[str]]:
    """``"I/N"`` -> planned ids, from input ``d``'s shard plans; adds each N to ``counts``."""
    planned = {}
    sd = os.path.join(d, SHARDS)
    if not os.path.isdir(sd):
        return planned
    for name in sorted(os.listdir(sd)):
        shard = parse_shard_file(name)
        if name.endswith(".plan") and shard is not None:
            i, n = shard
            counts.add(n)
            with open(os.path.join(sd, name), encoding="utf-8") as f:
                planned[f"{i}/{n}"] = [x for x in f.read().split("\n") if x]
    return planned


def _resolve(sources: list[_Source], on_conflict: str, report: MergeReport) -> list[tuple[dict, str]]:
    """One (record, its input directory) per id, the first met kept. An id whose later record
    differs (timings aside) is a ValueError, or with ``keep-first`` lands in ``report.dropped``."""
    kept: dict[str, tuple[dict, _Source]] = {}
    clashes: dict[tuple[str, str], list[str]] = {}  # (first's name, other's name) -> ids
    for s in sources:
        for r in s.records:
            if r["id"] not in kept:
                kept[r["id"]] = (r, s)
                continue
            first, fs = kept[r["id"]]
            if _comparable(first) == _comparable(r):
                continue
            names = (fs.dir, s.dir) if not _same_path(fs.dir, s.dir) else (fs.path, s.path)
            clashes.setdefault(names, []).append(r["id"])
            report.dropped.setdefault(r["id"], []).append(s.dir)
    if clashes and on_conflict == "fail":
        (a, b), ids = next(iter(clashes.items()))
        shown = ", ".join(sorted(ids)[:_SHOWN]) + (", ..." if len(ids) > _SHOWN else "")
        more = len(report.dropped) - len(set(ids))
        raise ValueError(
            f"{len(ids)} ids have different records in {a} and {b} ({shown})"
            f"{f' and {more} more ids in other inputs' if more else ''}: merging would lose samples; "
            f"use --on-conflict keep-first to keep {a}'s"
        )
    return [(r, s.dir) for r, s in kept.values()]
