"""Training and validation samples: image/mask pairs of a dataset folder, augmented by position.

Folders read (names from :mod:`pccfast.data.layout`): ``ROOT/JPEGImages/<id>.jpg|.jpeg|.png``
with ``ROOT/SegmentationClass/<id>.png``, which is both a pccfast dataset (generate, relabel
--as-dataset, merge) and a real Pascal VOC2012 folder; ``ROOT/VOCdevkit/VOC2012`` (the
torchvision nesting) is found from ``ROOT``. The ids are those of
``ImageSets/Segmentation/<split>.txt`` when that file exists, else every mask's. pccfast's
other layouts (WebDataset tars, Parquet files) are read through
:func:`pccfast.data.readers.open_source`: all their committed samples.

Sample ``p`` of a run (``p = iteration * batch + slot``) is a pure function of ``(seed, p)``:
the data order is a fresh permutation per pass over the data, seeded by ``(seed, pass)``, and
the sample's augmentation draws come from a generator seeded by ``(seed, p)``. So any rank,
any worker and a resumed run all see exactly the same samples.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pccfast.data.fileio import load_image, load_mask
from pccfast.data.layout import IMAGE_EXTS, IMAGES, LABELSET, MASKS, SPLIT, VOC_NESTING, detect_layout

__all__ = ["Pair", "dataset_root", "find_pairs", "dataset_label_set", "normalize", "augment", "TrainSamples", "EvalSamples",
           "MEAN", "STD", "sample_seed"]

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics (torchvision's backbones were trained with them)
STD = (0.229, 0.224, 0.225)
_NESTINGS = ("", VOC_NESTING, os.path.basename(VOC_NESTING))


@dataclass(frozen=True)
class Pair:
    """One image and its mask."""

    id: str
    image: str  # path of the image file (VOC layout), or where it is stored
    mask: str  # path of the palette/greyscale PNG mask (VOC layout), or where it is stored
    source: object = None  # tars and parquet files: the opened source (data.readers.Source) ...
    locator: object = None  # ... and the sample's place in it (data.readers.Locator)


def dataset_root(path: str, option: str = "DATASET") -> str:
    """The folder holding ``JPEGImages/`` and ``SegmentationClass/``: ``path`` itself or its
    ``VOCdevkit/VOC2012`` (or ``VOC2012``) folder; ValueError (one line) otherwise."""
    if not os.path.isdir(path):
        raise ValueError(f"`{option}` {path!r} is not a folder")
    for sub in _NESTINGS:
        root = os.path.join(path, sub) if sub else path
        if os.path.isdir(os.path.join(root, IMAGES)) and os.path.isdir(os.path.join(root, MASKS)):
            return root
    raise ValueError(f"`{option}` {path!r} is not a dataset folder: it has no {IMAGES}/ and {MASKS}/ (expected a "
                     f"pccfast dataset, a VOC2012 folder or a folder holding VOCdevkit/VOC2012)")


def _by_stem(folder: str, exts: tuple[str, ...]) -> dict[str, str]:
    """stem -> file name for the files of ``folder`` with one of ``exts`` (case-insensitive),
    the first extension of ``exts`` winning."""
    found: dict[str, tuple[int, str]] = {}
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        rank = exts.index(ext.lower()) if ext.lower() in exts else -1
        if rank >= 0 and not name.startswith(".") and (stem not in found or rank < found[stem][0]):
            found[stem] = (rank, name)
    return {s: n for s, (_, n) in found.items()}


def _other_layout(path: str) -> str | None:
    try:
        layout = detect_layout(path)
    except ValueError:
        return None
    return layout if layout in ("webdataset", "parquet") else None


def dataset_label_set(path: str) -> "str | dict":
    """What the dataset ``path`` says its classes are: its ``labelset.json`` (a parquet
    dataset's label set from its metadata), else ``"voc"``."""
    for root in (path, *(os.path.join(path, sub) for sub in _NESTINGS if sub)):
        if os.path.isfile(os.path.join(root, LABELSET)):
            return os.path.join(root, LABELSET)
    if _other_layout(path) == "parquet":
        from pccfast.data.readers import open_source

        return open_source(path).label_set or "voc"
    return "voc"


def _source_pairs(path: str, option: str) -> list[Pair]:
    from pccfast.data.readers import open_source

    try:
        source = open_source(path)
    except ImportError as e:  # parquet without pyarrow
        raise ValueError(f"`{option}` {path!r}: {e}") from None
    if not source.items:
        raise ValueError(f"`{option}` {path!r} holds no committed sample ({source.layout} layout)")
    where = os.path.join(path, source.layout)
    return [Pair(it.id, where, where, source, it) for it in sorted(source.items, key=lambda it: it.id)]


def find_pairs(path: str, split: str, option: str = "DATASET") -> list[Pair]:
    """The image/mask pairs of ``path`` (see the module docstring), sorted by id.

    Raises ValueError (one line) for a folder that is no dataset, ids of the split file without
    an image or a mask, or no pair at all."""
    if os.path.isdir(path) and _other_layout(path):
        return _source_pairs(path, option)
    root = dataset_root(path, option)
    images = _by_stem(os.path.join(root, IMAGES), IMAGE_EXTS)
    masks = _by_stem(os.path.join(root, MASKS), (".png",))
    split_file = os.path.join(root, os.path.dirname(SPLIT), f"{split}.txt")
    if os.path.isfile(split_file):
        with open(split_file, encoding="utf-8") as f:
            ids = list(dict.fromkeys(s.split()[0] for s in f if s.strip()))
        lacking = [i for i in ids if i not in images or i not in masks]
        if lacking:
            raise ValueError(f"`{option}` {split_file}: {len(lacking)} of its {len(ids)} ids have no image in {IMAGES}/ "
                             f"or no mask in {MASKS}/ (first: {lacking[0]})")
    else:
        ids = sorted(i for i in masks if i in images)
    if not ids:
        raise ValueError(f"`{option}` {root!r} holds no image with a mask ({IMAGES}/<id>.jpg and {MASKS}/<id>.png)")
    return [Pair(i, os.path.join(root, IMAGES, images[i]), os.path.join(root, MASKS, masks[i])) for i in sorted(ids)]


def normalize(image: torch.Tensor) -> torch.Tensor:
    """``image: (*, 3, H, W)`` uint8 RGB -> float32 ImageNet-normalised, same shape."""
    mean = torch.tensor(MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(STD, device=image.device).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std


def augment(image: torch.Tensor, mask: torch.Tensor, crop: int, scale: tuple[float, float], flip: bool,
            generator: torch.Generator, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resize, pad, crop and horizontal flip of one sample.

    Args:
        image: (3, H, W) float (normalised); mask: (H, W) long labels.
        crop: side of the square output.
        scale: the short side is resized to ``crop * U(scale)`` (aspect kept; bilinear for the
            image, nearest for the mask).
        flip: flip left-right with probability 1/2.
        generator: a CPU generator, the only source of the draws.
    Returns: ``(3, crop, crop)`` float image (padding 0, the mean colour) and ``(crop, crop)``
    long mask (padding ``ignore_index``).
    """
    if image.ndim != 3 or mask.shape != image.shape[1:]:
        raise ValueError(f"`image` (3, H, W) and `mask` (H, W) have to match but are {tuple(image.shape)} and "
                         f"{tuple(mask.shape)}")
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()  # scale, y, x, flip
    h, w = image.shape[1:]
    s = crop * (scale[0] + (scale[1] - scale[0]) * u[0]) / min(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]  # (3, nh, nw)
    mask = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()  # (nh, nw)
    ph, pw = max(crop - nh, 0), max(crop - nw, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        mask = F.pad(mask, (0, pw, 0, ph), value=ignore_index)
    y0 = int(u[1] * (image.shape[1] - crop + 1))
    x0 = int(u[2] * (image.shape[2] - crop + 1))
    image, mask = image[:, y0:y0 + crop, x0:x0 + crop], mask[y0:y0 + crop, x0:x0 + crop]
    if flip and u[3] < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    return image.contiguous(), mask.contiguous()


def sample_seed(seed: int, position: int) -> int:
    """The generator seed of sample ``position`` of a run seeded ``seed``."""
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (2 ** 63)


def _read(pair: Pair, num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if pair.locator is not None:
        from pccfast.data.readers import read_encoded

        files = read_encoded(pair.source, [pair.locator])[0].files
        image_file, mask_file = io.BytesIO(files["image"]), io.BytesIO(files["mask"])
    else:
        image_file, mask_file = pair.image, pair.mask
    image = torch.from_numpy(np.array(load_image(image_file))).permute(2, 0, 1)  # (3, H, W) uint8
    try:
        mask = load_mask(mask_file)  # (H, W) uint8
    except ValueError as e:
        raise ValueError(f"{pair.mask}: {str(e).split(': ', 1)[-1]}") from None
    if mask.shape != tuple(image.shape[1:]):
        raise ValueError(f"{pair.mask}: the mask is {mask.shape[0]}x{mask.shape[1]} but its image {pair.image} is "
                         f"{image.shape[1]}x{image.shape[2]} (height x width)")
    bad = (mask >= num_classes) & (mask != ignore_index)
    if bad.any():
        raise ValueError(f"{pair.mask}: holds label {int(mask[bad].max())} but the label set has {num_classes} classes "
                         f"(0..{num_classes - 1}, {ignore_index} ignored)")
    return normalize(image), torch.from_numpy(mask.astype(np.int64))


class TrainSamples(torch.utils.data.Dataset):
    """Augmented training samples indexed by run position (see the module docstring)."""

    def __init__(self, pairs: list[Pair], num_classes: int, *, crop: int, scale: tuple[float, float], flip: bool,
                 seed: int, ignore_index: int = 255):
        self.pairs, self.num_classes, self.ignore_index = pairs, num_classes, ignore_index
        self.crop, self.scale, self.flip, self.seed = crop, scale, flip, seed
        self._order: tuple[int, torch.Tensor] | None = None  # (pass, permutation) cache

    def __len__(self) -> int:
        return len(self.pairs)

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of the pairs for pass ``epoch`` over the data."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, -1 - epoch))
            self._order = (epoch, torch.randperm(len(self.pairs), generator=g))
        return self._order[1]

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.pairs)
        pair = self.pairs[int(self.order(position // n)[position % n])]
        image, mask = _read(pair, self.num_classes, self.ignore_index)
        g = torch.Generator().manual_seed(sample_seed(self.seed, position))
        return augment(image, mask, self.crop, self.scale, self.flip, g, self.ignore_index)


class EvalSamples(torch.utils.data.Dataset):
    """Validation samples at their own size: ``(image (3, H, W) float, mask (H, W) long)``."""

    def __init__(self, pairs: list[Pair], num_classes: int, ignore_index: int = 255):
        self.pairs, self.num_classes, self.ignore_index = pairs, num_classes, ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _read(self.pairs[i], self.num_classes, self.ignore_index)
