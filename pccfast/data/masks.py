"""Relabelling's files: captures (with their images) in, masks or a whole dataset out.

* :func:`find_inputs` lists ``<id>.safetensors`` captures with their ``<id>.jpg|.jpeg|.png``
  images (:func:`images_folder` accepts a dataset folder for its ``JPEGImages/``);
  :func:`read_pair` reads and checks one input, taking the capture's own decoded image when
  it holds one (format_version 2) and the image file otherwise (a one-line ValueError naming the file);
* :func:`read_infos`, :func:`captures_label_set` and :func:`first_without_image` look at the
  captures' headers only, before a run: the label set they record, and whether every one
  holds its image;
* :class:`MaskStore` is the driver's side of a mask folder: an id is done when its mask exists
  (masks are written last, atomically) and the label set is checked; :class:`DatasetStore`
  that of a complete dataset (``--as-dataset``): generate's :class:`~pccfast.data.manifest.Manifest`;
* :class:`MaskWriter` is the worker's side: the files of one item, the mask last.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from pccfast.core.labelset import BUILTIN, LabelSet
from pccfast.data.captures import CaptureError, CaptureInfo, read_capture, read_capture_info
from pccfast.data.fileio import atomic_link_or_copy, check_id, load_image, save_image, save_mask_png
from pccfast.data.labelsets import get_label_set
from pccfast.data.layout import BLOCKY, CAPTURE_EXT, IMAGE_EXTS, IMAGES, LABELSET, MASKS, sample_paths
from pccfast.data.manifest import Manifest, check_output_folder, make_output_folder

__all__ = ["InputPair", "Pair", "images_folder", "find_inputs", "read_pair", "read_infos", "captures_label_set",
           "first_without_image", "MaskStore", "DatasetStore", "MaskWriter"]

_JPEG_EXTS = (".jpg", ".jpeg")  # image files a dataset's JPEGImages/<id>.jpg can be a link to


@dataclass
class InputPair:
    """One relabelling input: ``index`` is its position in id order (for sharding)."""

    id: str
    capture: str  # path of <id>.safetensors
    image: str | None  # path of the image file, None if there is none
    index: int = 0


@dataclass
class Pair:
    """A read and checked input."""

    id: str
    capture: str
    features: np.ndarray  # (D, h, w) float32, usually a view of the memory-mapped file
    class_attention: np.ndarray  # (K, h, w) float32
    image: np.ndarray  # (H, W, 3) uint8: the capture's own image if it holds one, else the image file's
    metadata: dict = field(default_factory=dict)  # the capture's metadata (Capture.metadata)
    source: str | None = None  # the image file, if there is one
    dd_affinity: np.ndarray | None = None  # (N2, N2) float32: Dataset Diffusion's affinity, if the capture holds it
    dd_class_attention: np.ndarray | None = None  # (K, h4, w4) float32: its class maps, likewise


def _has_images(folder: str) -> bool:
    return any(os.path.splitext(n)[1].lower() in IMAGE_EXTS and not n.startswith(".") for n in os.listdir(folder))


def images_folder(images: str) -> str:
    """``images``, or ``images/JPEGImages`` when ``images`` is a dataset folder (it holds no
    images itself but has that folder)."""
    inner = os.path.join(images, IMAGES)
    if os.path.isdir(inner) and not _has_images(images):
        return inner
    return images


def find_inputs(captures: str, images: str | None = None) -> list[InputPair]:
    """Every ``<id>.safetensors`` in ``captures``, sorted by id, with its image in ``images``
    (``<id>.jpg``, ``.jpeg`` or ``.png``, first found, case-insensitive extension; none when
    ``images`` is None)."""
    by_stem: dict[str, str] = {}
    for name in sorted(os.listdir(images)) if images is not None else ():
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


def _with_dd(pair: Pair, cap) -> Pair:
    """``pair`` with the capture's Dataset Diffusion tensors, if it holds them."""
    if cap.dd_affinity is not None:
        pair.dd_affinity, pair.dd_class_attention = cap.dd_affinity.numpy(), cap.dd_class_attention.numpy()
    return pair


def read_pair(entry: InputPair, images_dir: str | None, label_set: LabelSet) -> Pair:
    """Read and check one input; ValueError with a one-line message naming the file.

    The capture's own image (format_version 2) is the one labelled when it holds one (it is
    the decoded image generate refined from, so the masks come out the same); otherwise the
    image file ``entry.image``."""
    check_id(entry.id)
    cap = read_capture(entry.capture, label_set)
    features, class_attention = cap.features.numpy(), cap.class_attention.numpy()
    if cap.image is not None:
        pixels = cap.image.numpy().transpose(1, 2, 0)  # (H, W, 3) view of the (3, H, W) tensor
        return _with_dd(Pair(entry.id, entry.capture, features, class_attention, pixels, cap.metadata, entry.image), cap)
    if entry.image is None:
        if images_dir is None:
            raise ValueError(f"{entry.capture}: holds no image (written before capture format_version 2) "
                             "and no --images folder was given")
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
    return _with_dd(Pair(entry.id, entry.capture, features, class_attention, pixels, cap.metadata, entry.image), cap)


def read_infos(entries: list[InputPair]) -> list[CaptureInfo | None]:
    """The header of each capture (:func:`~pccfast.data.captures.read_capture_info`); None for
    one that cannot be read (it becomes that item's failure when the run reads it)."""
    out = []
    for e in entries:
        try:
            out.append(read_capture_info(e.capture))
        except CaptureError:
            out.append(None)
    return out


def _describe(info: CaptureInfo) -> str:
    return f"{info.label_set!r} ({len(info.label_classes)} classes)"


def captures_label_set(infos: list[CaptureInfo | None], captures: str) -> LabelSet | None:
    """The one label set the captures record (``label_set``, ``label_classes``); None if no
    header could be read.

    A built-in set of that name and those classes is the built-in set; else a ``labelset.json``
    next to the captures (``captures/..``, as generate writes it, or in ``captures``) that has
    them, for its palette and texts; else a set of those names with the default palette.
    Raises:
        ValueError: two captures record different sets (one line naming both files and sets),
            or the recorded classes do not make a label set.
    """
    first = None
    for info in infos:
        if info is None:
            continue
        if first is None:
            first = info
        elif (info.label_set, info.label_classes) != (first.label_set, first.label_classes):
            raise ValueError(
                f"the captures record different label sets: {first.path} has {_describe(first)}, "
                f"{info.path} has {_describe(info)}; relabel them apart or give --label-set"
            )
    if first is None:
        return None
    name, classes = first.label_set, list(first.label_classes)
    if name.lower() in BUILTIN and list(get_label_set(name.lower()).classes) == classes:
        return get_label_set(name.lower())
    here = os.path.abspath(captures)
    for candidate in (os.path.join(os.path.dirname(here), LABELSET), os.path.join(here, LABELSET)):
        if os.path.isfile(candidate):
            try:
                ls = get_label_set(candidate)
            except (ValueError, OSError):
                continue
            if ls.name == name and list(ls.classes) == classes:
                return ls
    try:
        return get_label_set({"name": name, "classes": classes})
    except ValueError as e:
        raise ValueError(f"{first.path}: its label set {name!r} cannot be used: {e}") from None


def first_without_image(entries: list[InputPair], infos: list[CaptureInfo | None]) -> InputPair | None:
    """The first readable capture that holds no image (None if every one has its image)."""
    return next((e for e, info in zip(entries, infos) if info is not None and not info.has_image), None)


class MaskStore:
    """The driver's side of a relabelled dataset ``out``: resume by mask presence.

    ``overwrite`` counts nothing as done. Creating it checks first (``out`` a folder that can be
    written, its ``labelset.json`` naming this label set), then makes ``SegmentationClass/``,
    writes ``labelset.json`` and removes dead writers' temporaries.
    """

    def __init__(self, out: str, label_set: LabelSet, *, save_blocky: bool = False, overwrite: bool = False):
        self.out, self.save_blocky, self.overwrite = out, save_blocky, overwrite
        check_output_folder(out, label_set)
        # a read-only or full output fails now, in one line, not after the work
        make_output_folder(out, label_set, (MASKS,), [os.path.join(out, d) for d in (MASKS, BLOCKY)])
        self._planned: list[str] = []

    def paths(self, sample_id: str) -> list[str]:
        p = sample_paths(self.out, sample_id)
        return [p["mask"], p["blocky"], p["mask_pcc"], p["mask_dd"]]

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


class DatasetStore(Manifest):
    """The driver's side of a complete relabelled dataset (``relabel --as-dataset``): generate's
    :class:`~pccfast.data.manifest.Manifest` (an id is done when its manifest record, image and
    mask exist; ``finalize`` writes train.txt), which also needs the blocky mask with
    ``save_blocky``; ``overwrite`` counts nothing as done."""

    def __init__(self, out: str, label_set: LabelSet, shard: tuple[int, int] | None = None, *,
                 save_blocky: bool = False, overwrite: bool = False):
        super().__init__(out, label_set, shard)
        self.save_blocky, self.overwrite = save_blocky, overwrite

    def done_ids(self) -> set[str]:
        if self.overwrite:
            return set()
        done = super().done_ids()
        if self.save_blocky:
            done = {sid for sid in done if os.path.exists(sample_paths(self.out, sid)["blocky"])}
        return done


@dataclass
class MaskWriter:
    """Writes the files of relabelled items into ``out``: the mask (and blocky mask) PNGs and,
    with ``images``, ``JPEGImages/<id>.jpg``."""

    out: str
    label_set: LabelSet
    images: bool = False  # also write JPEGImages/<id>.jpg (a complete dataset)
    jpeg_quality: int = 95

    def write(self, sample_id: str, mask: np.ndarray, blocky: np.ndarray | None = None,
              image: "str | np.ndarray | None" = None, extra_masks: dict | None = None) -> None:
        """(H, W) uint8 label masks as palette PNGs; the mask last (it marks the id as done).

        ``image`` (with ``images``): a JPEG file to link (or copy) to ``JPEGImages/<id>.jpg``,
        or (H, W, 3) uint8 pixels to encode there. ``extra_masks``: more masks by their
        ``sample_paths`` key (each labeller's own mask with ``--save-all-labelers``)."""
        p = sample_paths(self.out, sample_id)
        pal = self.label_set.flat_palette()
        if self.images and image is not None:
            if isinstance(image, str):
                atomic_link_or_copy(image, p["image"])
            else:
                save_image(p["image"], image, quality=self.jpeg_quality)
        if blocky is not None:
            save_mask_png(p["blocky"], blocky, pal)
        for key, extra in (extra_masks or {}).items():
            save_mask_png(p[key], extra, pal)
        save_mask_png(p["mask"], mask, pal)

    def dataset_image(self, pair: Pair) -> "str | np.ndarray | None":
        """What :meth:`write` takes for ``pair``'s JPEGImages file: its image file when that is
        a JPEG, else its pixels (encoded as JPEG); None without ``images``."""
        if not self.images:
            return None
        if pair.source is not None and os.path.splitext(pair.source)[1].lower() in _JPEG_EXTS:
            return pair.source
        return pair.image
