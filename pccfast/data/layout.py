"""The dataset layout: every folder and file name pccfast reads or writes, in one place.

VOC layout (readable as-is by torchvision's and mmsegmentation's VOC loaders)::

    OUT/JPEGImages/<id>.jpg
    OUT/SegmentationClass/<id>.png          8-bit palette PNG, 255 = uncertain
    OUT/SegmentationClassBlocky/<id>.png    optional (--save-blocky)
    OUT/SegmentationClassPCC/<id>.png       optional (--save-all-labelers): PCC's own mask
    OUT/SegmentationClassDD/<id>.png        optional (--save-all-labelers): Dataset Diffusion's own mask
    OUT/captures/<id>.safetensors           optional (--save-captures), read by relabel
    OUT/ImageSets/Segmentation/train.txt    one id per line
    OUT/manifest.jsonl                      one JSON record per finished image
    OUT/labelset.json                       the label set
    OUT/run.json                            provenance: what defines the samples (generate)
    OUT/manifests/shard-I-of-N.jsonl|.plan  sharded runs: their records and planned ids

WebDataset layout (``--format webdataset``; :mod:`pccfast.data.shards`)::

    OUT/shards/<prefix>-NNNNNN.tar          per sample <id>.jpg, <id>.png, <id>.json (its record),
                                            optional <id>.blocky.png, <id>.safetensors
    OUT/shards.json                         the shard index: names, sample counts, byte sizes
    OUT/manifest.jsonl, labelset.json, run.json, manifests/   as above; each record names its ``shard``

Parquet layout (``export --to parquet``; :mod:`pccfast.data.parquet`)::

    OUT/data/<prefix>-NNNNNN.parquet        one row per sample; image and mask as Image features
    OUT/manifest.jsonl, labelset.json, run.json               as above

``<prefix>`` is ``train`` for an unsharded run and ``train-shard-I-of-N`` for ``--shard I/N``.
"""
from __future__ import annotations

import os

__all__ = [
    "IMAGES", "MASKS", "BLOCKY", "MASKS_PCC", "MASKS_DD", "LABELER_MASKS", "CAPTURES", "SPLIT", "MANIFEST", "LABELSET", "RUN_FILE", "SHARDS", "IMAGE_EXTS",
    "CAPTURE_EXT", "sample_paths", "shard_manifest", "shard_plan", "parse_shard_file",
    "output_dirs", "FORMATS", "TARS", "TAR_INDEX", "PARQUETS", "TAR_EXT", "PARQUET_EXT", "MEMBERS", "LOCATION_KEYS",
    "file_prefix", "numbered_name", "parse_numbered_name", "detect_layout", "VOC_NESTING", "TRAIN_RUN_FILES",
]

IMAGES = "JPEGImages"
MASKS = "SegmentationClass"
BLOCKY = "SegmentationClassBlocky"
MASKS_PCC = "SegmentationClassPCC"  # --save-all-labelers: PCC's mask beside the chosen labeller's
MASKS_DD = "SegmentationClassDD"  # --save-all-labelers: Dataset Diffusion's mask
LABELER_MASKS = {"pcc": "mask_pcc", "dd": "mask_dd"}  # labeller -> its key in sample_paths
CAPTURES = "captures"
SPLIT = os.path.join("ImageSets", "Segmentation", "train.txt")
MANIFEST = "manifest.jsonl"
LABELSET = "labelset.json"
RUN_FILE = "run.json"  # provenance: the settings that define the dataset's samples
SHARDS = "manifests"
VOC_NESTING = os.path.join("VOCdevkit", "VOC2012")  # torchvision's VOCSegmentation looks for ROOT/<this>
# a training run folder (python -m pccfast.train --out RUN_DIR)
TRAIN_RUN_FILES = {"last": "last.pt", "best": "best.pt", "log": "log.jsonl", "plot": "curves.png", "info": "train.json"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")  # input images are looked up in this order, case-insensitively
CAPTURE_EXT = ".safetensors"
FORMATS = ("voc", "webdataset", "parquet")  # dataset layouts (generate writes the first two)
TARS = "shards"  # webdataset tar shards
TAR_INDEX = "shards.json"  # the shard index of a webdataset dataset
PARQUETS = "data"  # parquet files (the folder Hugging Face Hub datasets keep them in)
TAR_EXT = ".tar"
PARQUET_EXT = ".parquet"
# a sample's files -> their extension in a tar (``<id>.<ext>``; webdataset keys split at the first dot)
MEMBERS = {"image": "jpg", "mask": "png", "record": "json", "blocky": "blocky.png", "capture": "safetensors"}
LOCATION_KEYS = ("shard",)  # record fields that say where a sample is stored, not what it is


def sample_paths(out: str, sample_id: str) -> dict[str, str]:
    """Where each file of sample ``sample_id`` lives in dataset ``out``:
    ``image``, ``mask``, ``blocky``, ``mask_pcc``, ``mask_dd``, ``capture``."""
    return {
        "image": os.path.join(out, IMAGES, f"{sample_id}.jpg"),
        "mask": os.path.join(out, MASKS, f"{sample_id}.png"),
        "blocky": os.path.join(out, BLOCKY, f"{sample_id}.png"),
        "mask_pcc": os.path.join(out, MASKS_PCC, f"{sample_id}.png"),
        "mask_dd": os.path.join(out, MASKS_DD, f"{sample_id}.png"),
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
    return [os.path.join(out, d) for d in (IMAGES, MASKS, BLOCKY, MASKS_PCC, MASKS_DD, CAPTURES, SHARDS,
                                           os.path.dirname(SPLIT), ".")]


def file_prefix(shard: tuple[int, int] | None) -> str:
    """The name prefix of the tar or parquet files a run writes: ``train`` or ``train-shard-I-of-N``."""
    return "train" if shard is None else f"train-shard-{shard[0]}-of-{shard[1]}"


def numbered_name(prefix: str, number: int, ext: str) -> str:
    """``<prefix>-NNNNNN<ext>``, e.g. ``train-000003.tar``."""
    return f"{prefix}-{number:06d}{ext}"


def parse_numbered_name(name: str, ext: str) -> tuple[str, int] | None:
    """``<prefix>-NNNNNN<ext>`` -> (prefix, number); None for any other name."""
    if not name.endswith(ext) or name.startswith("."):
        return None
    prefix, _, number = name[: -len(ext)].rpartition("-")
    if not prefix or len(number) < 6 or not number.isdigit():
        return None
    return prefix, int(number)


def detect_layout(path: str) -> str:
    """Which of :data:`FORMATS` the dataset folder ``path`` holds; ValueError if none."""
    if os.path.isdir(os.path.join(path, TARS)) or os.path.isfile(os.path.join(path, TAR_INDEX)):
        return "webdataset"
    if os.path.isdir(os.path.join(path, MASKS)):
        return "voc"
    if os.path.isdir(os.path.join(path, PARQUETS)):
        return "parquet"
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a dataset folder (no such folder)")
    raise ValueError(f"{path}: not a dataset folder (no {MASKS}/, {TARS}/ or {PARQUETS}/)")
