"""The VOC-layout dataset on disk: writing samples atomically, the manifest, resume, merge.

Layout (readable as-is by torchvision's and mmsegmentation's VOC loaders)::

    OUT/JPEGImages/<id>.jpg
    OUT/SegmentationClass/<id>.png          8-bit palette PNG, 255 = uncertain
    OUT/SegmentationClassBlocky/<id>.png    optional (--save-blocky)
    OUT/captures/<id>.safetensors           optional (--save-captures), read by pccfast.relabel
    OUT/ImageSets/Segmentation/train.txt    one id per line
    OUT/manifest.jsonl                      one JSON record per finished image
    OUT/labelset.json                       the label set

A sample's files are written first (each atomically); its manifest line is appended last and
is the commit point: an id counts as done only when its manifest line exists and its image
and mask files are present. A run killed at any moment therefore loses at most the samples in
flight and leaves no truncated file. Sharded runs (``--shard I/N``) write their records to
``manifests/shard-I-of-N.jsonl`` and their planned ids to ``manifests/shard-I-of-N.plan``;
:func:`merge_datasets` rebuilds ``manifest.jsonl`` and ``train.txt`` from them.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from pccfast.data.fileio import append_line, atomic_write_bytes, check_id, clean_stale_temps, read_jsonl, save_image, save_mask_png
from pccfast.core.labelset import LabelSet

__all__ = ["DatasetWriter", "MergeReport", "merge_datasets", "dataset_paths"]

IMAGES = "JPEGImages"
MASKS = "SegmentationClass"
BLOCKY = "SegmentationClassBlocky"
CAPTURES = "captures"
SPLIT = os.path.join("ImageSets", "Segmentation", "train.txt")
MANIFEST = "manifest.jsonl"
LABELSET = "labelset.json"
SHARDS = "manifests"


def dataset_paths(out: str, sample_id: str) -> dict[str, str]:
    """Where each file of sample ``sample_id`` lives in dataset ``out``."""
    return {
        "image": os.path.join(out, IMAGES, f"{sample_id}.jpg"),
        "mask": os.path.join(out, MASKS, f"{sample_id}.png"),
        "blocky": os.path.join(out, BLOCKY, f"{sample_id}.png"),
        "capture": os.path.join(out, CAPTURES, f"{sample_id}.safetensors"),
    }


def _write_labelset(out: str, label_set: LabelSet) -> None:
    path = os.path.join(out, LABELSET)
    want = label_set.to_json()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                have = json.load(f)
            except json.JSONDecodeError:
                have = None
        if have is not None and have.get("classes") != want["classes"]:
            raise ValueError(
                f"{path}: the dataset was made with label set {have.get('name')!r} "
                f"({len(have.get('classes', []))} classes), not {label_set.name!r}; use another --out"
            )
        if have is not None:
            return
    atomic_write_bytes(path, (json.dumps(want, indent=1) + "\n").encode())


@dataclass
class DatasetWriter:
    """Writes samples into a VOC-layout dataset; ``shard`` = (index, count) or None."""

    out: str
    label_set: LabelSet
    save_blocky: bool = False
    save_captures: bool = False
    shard: tuple[int, int] | None = None
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        os.makedirs(os.path.join(self.out, IMAGES), exist_ok=True)
        os.makedirs(os.path.join(self.out, MASKS), exist_ok=True)
        _write_labelset(self.out, self.label_set)
        for sub in (IMAGES, MASKS, BLOCKY, CAPTURES, SHARDS, os.path.dirname(SPLIT), "."):
            clean_stale_temps(os.path.join(self.out, sub))

    # --- manifest -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> str:
        if self.shard is None:
            return os.path.join(self.out, MANIFEST)
        i, n = self.shard
        return os.path.join(self.out, SHARDS, f"shard-{i}-of-{n}.jsonl")

    def done_ids(self) -> set[str]:
        """Ids whose manifest record exists (in any manifest of this dataset) and whose files are there."""
        records = read_jsonl(os.path.join(self.out, MANIFEST))
        shard_dir = os.path.join(self.out, SHARDS)
        if os.path.isdir(shard_dir):
            for name in sorted(os.listdir(shard_dir)):
                if name.endswith(".jsonl"):
                    records += read_jsonl(os.path.join(shard_dir, name))
        done = set()
        for r in records:
            sid = str(r.get("id"))
            p = dataset_paths(self.out, sid)
            if os.path.exists(p["image"]) and os.path.exists(p["mask"]):
                done.add(sid)
        return done

    def write_plan(self, ids: list[str]) -> None:
        """Sharded runs record the ids they are responsible for (merge reports gaps from it)."""
        if self.shard is None:
            return
        i, n = self.shard
        path = os.path.join(self.out, SHARDS, f"shard-{i}-of-{n}.plan")
        atomic_write_bytes(path, ("\n".join(ids) + "\n").encode())

    # --- samples --------------------------------------------------------------------------
    def write_files(
        self,
        sample_id: str,
        image: np.ndarray,
        mask: np.ndarray,
        blocky: np.ndarray | None = None,
        capture: dict | None = None,
    ) -> None:
        """Write one sample's files atomically (image (H, W, 3) uint8, mask/blocky (H, W) uint8).

        The mask goes last so that a present mask implies the other files are complete.
        """
        check_id(sample_id)
        p = dataset_paths(self.out, sample_id)
        save_image(p["image"], image, quality=self.jpeg_quality)
        pal = self.label_set.flat_palette()
        if self.save_blocky and blocky is not None:
            save_mask_png(p["blocky"], blocky, pal)
        if self.save_captures and capture is not None:
            from pccfast.data.captures import write_capture

            write_capture(p["capture"], **capture)
        save_mask_png(p["mask"], mask, pal)

    def commit(self, record: dict) -> None:
        """Append a finished sample's manifest record (the commit point)."""
        append_line(self.manifest_path, json.dumps(record, ensure_ascii=False))

    def finalize(self) -> list[str]:
        """Rewrite train.txt from the done ids (unsharded runs); returns the ids."""
        if self.shard is not None:
            return []
        records = sorted(_dedup(read_jsonl(os.path.join(self.out, MANIFEST))), key=_order_key)  # prompt order,
        # not completion order (Ray workers finish batches out of order)
        ids = [r["id"] for r in records if os.path.exists(dataset_paths(self.out, r["id"])["mask"])]
        _write_split(self.out, ids)
        return ids


def _dedup(records: list[dict]) -> list[dict]:
    """Last record per id wins; order of first appearance kept."""
    by_id: dict[str, dict] = {}
    for r in records:
        if "id" in r:
            r["id"] = str(r["id"])
            by_id[r["id"]] = r
    return list(by_id.values())


def _write_split(out: str, ids: list[str]) -> None:
    atomic_write_bytes(os.path.join(out, SPLIT), "".join(f"{i}\n" for i in ids).encode())


@dataclass
class MergeReport:
    ids: list[str] = field(default_factory=list)  # ids in the merged train.txt
    missing: list[str] = field(default_factory=list)  # planned by a shard but not finished
    missing_shards: list[str] = field(default_factory=list)  # "I/N" with no plan file at all
    incomplete: list[str] = field(default_factory=list)  # manifest record without its files
    missing_by_shard: dict[str, list[str]] = field(default_factory=dict)  # "I/N" -> its missing ids


def _order_key(r: dict):
    idx = r.get("index")
    return (0, idx, "") if isinstance(idx, int) else (1, 0, str(r["id"]))


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
                elif name.endswith(".plan"):
                    stem = name[: -len(".plan")]  # shard-I-of-N
                    _, i, _, n = stem.split("-")
                    counts.add(int(n))
                    with open(full, encoding="utf-8") as f:
                        planned[f"{i}/{n}"] = [x for x in f.read().split("\n") if x]
        for r in recs:
            r["_dir"] = d
        records += recs
    merged = _dedup(records)
    for n in counts:
        for i in range(n):
            if f"{i}/{n}" not in planned:
                report.missing_shards.append(f"{i}/{n}")
    final = []
    for r in sorted(merged, key=_order_key):
        src_dir = r.pop("_dir")
        src = dataset_paths(src_dir, r["id"])
        if not (os.path.exists(src["image"]) and os.path.exists(src["mask"])):
            report.incomplete.append(r["id"])
            continue
        if os.path.abspath(src_dir) != os.path.abspath(target):
            dst = dataset_paths(target, r["id"])
            for key in ("image", "mask", "blocky", "capture"):
                if os.path.exists(src[key]):
                    _link_or_copy(src[key], dst[key])
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
    _write_split(target, report.ids)
    return report


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.abspath(src) == os.path.abspath(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".tmp-merge"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
