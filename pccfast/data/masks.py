"""Relabelling's files: capture + image pairs in, mask PNGs out.

* :func:`find_inputs` lists ``<id>.safetensors`` captures with their ``<id>.jpg|.jpeg|.png``
  images; :func:`read_pair` reads and checks one pair (a one-line ValueError naming the file);
* :class:`MaskStore` is the driver's side: an id is done when its mask exists (masks are
  written last, atomically) and the label set is checked;
* :class:`MaskWriter` is the worker's side: the PNGs of one item, the mask last.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pccfast.core.labelset import LabelSet
from pccfast.data.captures import read_capture
from pccfast.data.fileio import check_id, clean_stale_temps, load_image, save_mask_png
from pccfast.data.labelsets import ensure_label_set_file
from pccfast.data.layout import BLOCKY, CAPTURE_EXT, IMAGE_EXTS, MASKS, sample_paths

__all__ = ["InputPair", "Pair", "find_inputs", "read_pair", "MaskStore", "MaskWriter"]


@dataclass
class InputPair:
    """One relabelling input: ``index`` is its position in id order (for sharding)."""

    id: str
    capture: str  # path of <id>.safetensors
    image: str | None  # path of the image, None if there is none
    index: int = 0


@dataclass
class Pair:
    """A read and checked input pair."""

    id: str
    capture: str
    features: np.ndarray  # (D, h, w) float32, usually a view of the memory-mapped file
    class_attention: np.ndarray  # (K, h, w) float32
    image: np.ndarray  # (H, W, 3) uint8


def find_inputs(captures: str, images: str) -> list[InputPair]:
    """Every ``<id>.safetensors`` in ``captures``, sorted by id, with its image in ``images``
    (``<id>.jpg``, ``.jpeg`` or ``.png``, first found, case-insensitive extension)."""
    by_stem: dict[str, str] = {}
    for name in sorted(os.listdir(images)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS:
            best = by_stem.get(stem)
            if best is None or IMAGE_EXTS.index(ext.lower()) < IMAGE_EXTS.index(os.path.splitext(best)[1].lower()):
                by_stem[stem] = name
    out = []
    for name in sorted(os.listdir(captures)):
        if name.startswith(".") or not name.endswith(CAPTURE_EXT):
            continue  # hidden files and temporaries of atomic writes
        stem = name[: -len(CAPTURE_EXT)]
        image = by_stem.get(stem)
        out.append(InputPair(stem, os.path.join(captures, name), None if image is None else os.path.join(images, image),
                             len(out)))
    return out


def read_pair(entry: InputPair, images_dir: str, label_set: LabelSet) -> Pair:
    """Read and check one input pair; ValueError with a one-line message naming the file."""
    check_id(entry.id)
    cap = read_capture(entry.capture, label_set)
    if entry.image is None:
        names = ", ".join(entry.id + e for e in IMAGE_EXTS)
        raise ValueError(f"{entry.capture}: no image for it in {images_dir} (expected one of {names})")
    try:
        pixels = load_image(entry.image)  # (H, W, 3) uint8
    except Exception as e:  # PIL raises several types for broken or foreign files
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{entry.image}: cannot read the image: {first}") from None
    height, width = pixels.shape[:2]
    h, w = cap.grid
    if height % h or width % w:
        raise ValueError(
            f"{entry.image}: image is {width}x{height} (width x height) but has to be a multiple of the capture grid "
            f"{w}x{h} of {entry.capture}"
        )
    return Pair(entry.id, entry.capture, cap.features.numpy(), cap.class_attention.numpy(), pixels)


class MaskStore:
    """The driver's side of a relabelled dataset ``out``: resume by mask presence.

    ``overwrite`` counts nothing as done. Creating it makes ``SegmentationClass/``, writes or
    checks ``labelset.json`` (a dataset has one label set) and removes dead writers' temporaries.
    """

    def __init__(self, out: str, label_set: LabelSet, *, save_blocky: bool = False, overwrite: bool = False):
        self.out, self.save_blocky, self.overwrite = out, save_blocky, overwrite
        for d in (MASKS, BLOCKY):
            clean_stale_temps(os.path.join(out, d))
        os.makedirs(os.path.join(out, MASKS), exist_ok=True)
        ensure_label_set_file(out, label_set)
        self._planned: list[str] = []

    def paths(self, sample_id: str) -> list[str]:
        p = sample_paths(self.out, sample_id)
        return [p["mask"], p["blocky"]]

    def write_plan(self, ids: list[str]) -> None:
        self._planned = list(ids)  # a mask set keeps no plan file: its masks are its state

    def done_ids(self) -> set[str]:
        if self.overwrite:
            return set()
        done = set()
        for sid in self._planned:
            p = sample_paths(self.out, sid)
            if os.path.exists(p["mask"]) and (not self.save_blocky or os.path.exists(p["blocky"])):
                done.add(sid)
        return done

    def commit(self, record: dict) -> None:
        """Nothing to append: the mask, written last and atomically, is the commit point."""

    def finalize(self) -> None:
        """Nothing to rebuild."""


@dataclass
class MaskWriter:
    """Writes the mask (and blocky mask) PNGs of relabelled items into ``out``."""

    out: str
    label_set: LabelSet

    def write(self, sample_id: str, mask: np.ndarray, blocky: np.ndarray | None = None) -> None:
        """(H, W) uint8 label masks as palette PNGs; the mask last (it marks the id as done)."""
        p = sample_paths(self.out, sample_id)
        pal = self.label_set.flat_palette()
        if blocky is not None:
            save_mask_png(p["blocky"], blocky, pal)
        save_mask_png(p["mask"], mask, pal)
