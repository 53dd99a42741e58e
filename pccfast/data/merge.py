"""One dataset from what sharded runs wrote: rebuild ``manifest.jsonl`` and ``train.txt``, report gaps."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from pccfast.data.fileio import atomic_link_or_copy, atomic_write_bytes, read_jsonl
from pccfast.data.layout import LABELSET, MANIFEST, SHARDS, parse_shard_file, sample_paths
from pccfast.data.manifest import dedup_records, record_order, write_split

__all__ = ["MergeReport", "merge_datasets"]


@dataclass
class MergeReport:
    ids: list[str] = field(default_factory=list)  # ids in the merged train.txt
    missing: list[str] = field(default_factory=list)  # planned by a shard but not finished
    missing_shards: list[str] = field(default_factory=list)  # "I/N" with no plan file at all
    incomplete: list[str] = field(default_factory=list)  # manifest record without its files
    missing_by_shard: dict[str, list[str]] = field(default_factory=dict)  # "I/N" -> its missing ids


def merge_datasets(dirs: list[str], out: str | None = None) -> MergeReport:
    """Rebuild ``manifest.jsonl`` and ``train.txt`` from what shards wrote.

    With one directory (shards wrote into a shared folder) the merge is in place; with several,
    their files are copied into ``out`` (hard links where possible). Gaps (planned ids with no
    finished sample, shards that never started) are reported, not invented.
    """
    if not dirs:
        raise ValueError("`dirs` has to name at least one dataset directory but is empty")
    for d in dirs:
        if not os.path.isdir(d):
            raise ValueError(f"{d}: not a dataset directory")
    target = out or dirs[0]
    if len(dirs) > 1 and out is None:
        raise ValueError("merging several directories needs `out` (--out DIR)")
    report = MergeReport()
    records: list[dict] = []
    planned: dict[str, list[str]] = {}
    counts: set[int] = set()
    labelset = None
    for d in dirs:
        ls = os.path.join(d, LABELSET)
        if os.path.exists(ls):
            with open(ls, encoding="utf-8") as f:
                this = json.load(f)
            if labelset is not None and this.get("classes") != labelset.get("classes"):
                raise ValueError(f"{ls}: label set {this.get('name')!r} differs from the other directories'")
            labelset = this
        recs = read_jsonl(os.path.join(d, MANIFEST))
        sd = os.path.join(d, SHARDS)
        if os.path.isdir(sd):
            for name in sorted(os.listdir(sd)):
                full = os.path.join(sd, name)
                if name.endswith(".jsonl"):
                    recs += read_jsonl(full)
                elif name.endswith(".plan") and parse_shard_file(name) is not None:
                    i, n = parse_shard_file(name)
                    counts.add(n)
                    with open(full, encoding="utf-8") as f:
                        planned[f"{i}/{n}"] = [x for x in f.read().split("\n") if x]
        for r in recs:
            r["_dir"] = d
        records += recs
    merged = dedup_records(records)
    for n in counts:
        for i in range(n):
            if f"{i}/{n}" not in planned:
                report.missing_shards.append(f"{i}/{n}")
    final = []
    for r in sorted(merged, key=record_order):
        src_dir = r.pop("_dir")
        src = sample_paths(src_dir, r["id"])
        if not (os.path.exists(src["image"]) and os.path.exists(src["mask"])):
            report.incomplete.append(r["id"])
            continue
        if os.path.abspath(src_dir) != os.path.abspath(target):
            dst = sample_paths(target, r["id"])
            for key in ("image", "mask", "blocky", "capture"):
                if os.path.exists(src[key]):
                    atomic_link_or_copy(src[key], dst[key])
        final.append(r)
    done = {r["id"] for r in final}
    for key, ids in planned.items():
        gap = [i for i in ids if i not in done]
        if gap:
            report.missing_by_shard[key] = gap
        report.missing += gap
    if labelset is not None:
        atomic_write_bytes(os.path.join(target, LABELSET), (json.dumps(labelset, indent=1) + "\n").encode())
    atomic_write_bytes(
        os.path.join(target, MANIFEST), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in final).encode()
    )
    report.ids = [r["id"] for r in final]
    write_split(target, report.ids)
    return report
