"""The dataset layout: every folder and file name pccfast reads or writes, in one place.

VOC layout (readable as-is by torchvision's and mmsegmentation's VOC loaders)::

    OUT/JPEGImages/<id>.jpg
    OUT/SegmentationClass/<id>.png          8-bit palette PNG, 255 = uncertain
    OUT/SegmentationClassBlocky/<id>.png    optional (--save-blocky)
    OUT/captures/<id>.safetensors           optional (--save-captures), read by relabel
    OUT/ImageSets/Segmentation/train.txt    one id per line
    OUT/manifest.jsonl                      one JSON record per finished image
    OUT/labelset.json                       the label set
    OUT/run.json                            provenance: what defines the samples (generate)
    OUT/manifests/shard-I-of-N.jsonl|.plan  sharded runs: their records and planned ids
"""
from __future__ import annotations

import os

__all__ = [
    "IMAGES", "MASKS", "BLOCKY", "CAPTURES", "SPLIT", "MANIFEST", "LABELSET", "RUN_FILE", "SHARDS", "IMAGE_EXTS",
    "CAPTURE_EXT", "sample_paths", "shard_manifest", "shard_plan", "parse_shard_file",
    "output_dirs",
]

IMAGES = "JPEGImages"
MASKS = "SegmentationClass"
BLOCKY = "SegmentationClassBlocky"
CAPTURES = "captures"
SPLIT = os.path.join("ImageSets", "Segmentation", "train.txt")
MANIFEST = "manifest.jsonl"
LABELSET = "labelset.json"
RUN_FILE = "run.json"  # provenance: the settings that define the dataset's samples
SHARDS = "manifests"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")  # input images are looked up in this order, case-insensitively
CAPTURE_EXT = ".safetensors"


def sample_paths(out: str, sample_id: str) -> dict[str, str]:
    """Where each file of sample ``sample_id`` lives in dataset ``out``:
    ``image``, ``mask``, ``blocky``, ``capture``."""
    return {
        "image": os.path.join(out, IMAGES, f"{sample_id}.jpg"),
        "mask": os.path.join(out, MASKS, f"{sample_id}.png"),
        "blocky": os.path.join(out, BLOCKY, f"{sample_id}.png"),
        "capture": os.path.join(out, CAPTURES, f"{sample_id}{CAPTURE_EXT}"),
    }


def shard_manifest(out: str, shard: tuple[int, int]) -> str:
    """The manifest a sharded run ``shard = (I, N)`` appends to."""
    i, n = shard
    return os.path.join(out, SHARDS, f"shard-{i}-of-{n}.jsonl")


def shard_plan(out: str, shard: tuple[int, int]) -> str:
    """The list of ids a sharded run ``shard = (I, N)`` was given."""
    i, n = shard
    return os.path.join(out, SHARDS, f"shard-{i}-of-{n}.plan")


def parse_shard_file(name: str) -> tuple[int, int] | None:
    """``shard-I-of-N.jsonl`` or ``.plan`` -> (I, N); None for any other name."""
    stem = name.rsplit(".", 1)[0]
    parts = stem.split("-")
    if len(parts) != 4 or parts[0] != "shard" or parts[2] != "of" or not (parts[1].isdigit() and parts[3].isdigit()):
        return None
    return int(parts[1]), int(parts[3])


def output_dirs(out: str) -> list[str]:
    """Every folder a run writes files into (where a killed writer may have left temporaries)."""
    return [os.path.join(out, d) for d in (IMAGES, MASKS, BLOCKY, CAPTURES, SHARDS, os.path.dirname(SPLIT), ".")]
