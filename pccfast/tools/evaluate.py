"""Segmentation scores of predicted masks against ground-truth masks (the VOC convention).

- Ground-truth pixels labelled ``ignore_index`` (255) are not counted.
- A predicted label outside the label set (255 included) is always wrong: the pixel counts for
  its ground-truth class (a false negative) and for no predicted class.
- IoU of class c = TP / (TP + FP + FN); accuracy of class c = TP / (ground-truth pixels of c);
  a class with no pixel in either the ground truth or the prediction has IoU NaN and is left
  out of the mean (mIoU = mean over the other classes).
- Pixel accuracy = correct pixels / counted pixels.

Either side is a folder of PNG masks, a VOC dataset root (its ``SegmentationClass`` folder) or
a WebDataset / Parquet dataset, whose masks are read through :mod:`pccfast.data.readers` a batch
at a time (:mod:`pccfast.tools.packed`). Masks are paired by id (a file's name without
``.png``, a sample's id).

Command line: ``python -m pccfast.evaluate PRED_DIR GT_DIR`` prints a table (see ``--help``).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from pccfast.data.fileio import load_mask
from pccfast.data.labelsets import get_label_set
from pccfast.data.layout import LABELSET, MASKS
from pccfast.data.readers import Source
from pccfast.tools.packed import location, open_packed, packed_layout, read_packed, stored_label_set

__all__ = ["confusion_matrix", "scores", "EvalReport", "evaluate_dirs", "mask_dir", "MaskSet", "open_masks",
           "masks_name", "default_label_set"]


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int = 255):
    """Pixel counts per (ground truth, prediction) pair.

    Args:
        pred: (*) integer labels, any shape, e.g. (B, H, W).
        gt: (*) integer labels, the same shape; ``ignore_index`` pixels are not counted.
        num_classes: C, labels 0..C-1.
        ignore_index: the ground truth's "do not count" label.

    Returns: (C, C + 1) int64: ``[g, p]`` pixels of ground truth g predicted as p; column C
    counts predictions outside 0..C-1 (e.g. 255), all wrong. A torch tensor on ``gt``'s device
    if either input is a tensor, else a NumPy array (NumPy is the faster choice on the CPU for
    the per-image counts of the CLI).
    Raises: ValueError if ``gt`` holds a label outside 0..C-1 other than ``ignore_index``.
    """
    if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        xp, gt = torch, torch.as_tensor(gt)
        pred = torch.as_tensor(pred).to(gt.device)
        integer = not (pred.is_floating_point() or gt.is_floating_point())
        as_long = lambda x: x.long()  # noqa: E731
    else:
        xp, pred, gt = np, np.asarray(pred), np.asarray(gt)
        integer = all(np.issubdtype(x.dtype, np.integer) or x.dtype == bool for x in (pred, gt))
        as_long = lambda x: x.astype(np.int64)  # noqa: E731
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"`pred` and `gt` have to have the same shape but have {tuple(pred.shape)} and {tuple(gt.shape)}")
    if not integer:
        raise TypeError(f"`pred` and `gt` have to hold integer labels but are {pred.dtype} and {gt.dtype}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` has to be a positive int but is {num_classes!r}")
    c = num_classes
    gt = as_long(gt.reshape(-1))  # (N,)
    pred = as_long(pred.reshape(-1))  # (N,)
    ignored = gt == ignore_index
    bad = ~ignored & ((gt < 0) | (gt >= c))
    if bool(bad.any()):
        values = xp.unique(gt[bad])[:5].tolist()
        raise ValueError(f"`gt` has to hold labels 0..{c - 1} or {ignore_index} (ignored) but holds {values}")
    pred = xp.where((pred >= 0) & (pred < c), pred, c)  # invalid -> column C
    # ignored pixels go to one extra bin past the matrix (cheaper than selecting the others)
    index = xp.where(ignored, c * (c + 1), gt * (c + 1) + pred)  # (N,)
    counts = xp.bincount(index, minlength=c * (c + 1) + 1)[: c * (c + 1)]
    return counts.reshape(c, c + 1)  # (C, C+1)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def scores(confusion) -> dict:
    """IoU and accuracy from a (C, C + 1) confusion matrix (see :func:`confusion_matrix`).

    Returns: ``iou`` (C,), ``acc`` (C,) float64 arrays (NaN where undefined), ``miou``,
    ``macc`` (NaN-skipping means), ``pixel_acc``, ``tp``/``gt_pixels``/``pred_pixels`` (C,).
    """
    cm = _numpy(confusion).astype(np.float64)
    if cm.ndim != 2 or cm.shape[1] != cm.shape[0] + 1:
        raise ValueError(f"`confusion` has to be (C, C + 1) but has shape {cm.shape}")
    c = cm.shape[0]
    tp = np.diag(cm[:, :c])  # (C,)
    gt_pixels = cm.sum(1)  # (C,) incl. invalid predictions
    pred_pixels = cm[:, :c].sum(0)  # (C,)
    union = gt_pixels + pred_pixels - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_pixels > 0, tp / gt_pixels, np.nan)
    total = gt_pixels.sum()
    return {
        "iou": iou,
        "acc": acc,
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
        "macc": float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan,
        "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
        "tp": tp,
        "gt_pixels": gt_pixels,
        "pred_pixels": pred_pixels,
    }


def _num(x: float):
    return None if x is None or math.isnan(x) else float(x)


@dataclass
class EvalReport:
    """Scores of a prediction folder against a ground-truth folder."""

    classes: tuple[str, ...]  # class names, index = label
    confusion: np.ndarray  # (C, C+1) int64 pixel counts (column C: predictions outside the label set)
    iou: np.ndarray  # (C,) per-class IoU, NaN where the class is in neither
    acc: np.ndarray  # (C,) per-class accuracy (recall), NaN where the class is not in the ground truth
    miou: float  # mean IoU over classes with a defined IoU
    macc: float  # mean class accuracy over classes present in the ground truth
    pixel_acc: float  # correct / counted pixels
    n_images: int  # images scored (present in both folders)
    only_in_pred: list = field(default_factory=list)  # ids with a prediction but no ground truth
    only_in_gt: list = field(default_factory=list)  # ids with ground truth but no prediction
    missing: list = field(default_factory=list)  # ids asked for (``ids``) but in neither folder

    @classmethod
    def from_confusion(cls, confusion, classes, n_images: int = 0, **lists) -> "EvalReport":
        cm = _numpy(confusion).astype(np.int64)
        s = scores(cm)
        return cls(tuple(classes), cm, s["iou"], s["acc"], s["miou"], s["macc"], s["pixel_acc"], n_images, **lists)

    @property
    def invalid_pred_share(self) -> float:
        """Share of counted pixels predicted with a label outside the set (e.g. 255)."""
        total = self.confusion.sum()
        return float(self.confusion[:, -1].sum() / total) if total else math.nan

    def to_json(self) -> dict:
        return {
            "classes": list(self.classes),
            "iou": {c: _num(v) for c, v in zip(self.classes, self.iou)},
            "acc": {c: _num(v) for c, v in zip(self.classes, self.acc)},
            "miou": _num(self.miou),
            "macc": _num(self.macc),
            "pixel_acc": _num(self.pixel_acc),
            "invalid_pred_share": _num(self.invalid_pred_share),
            "n_images": self.n_images,
            "only_in_pred": list(self.only_in_pred),
            "only_in_gt": list(self.only_in_gt),
            "missing": list(self.missing),
            "confusion": self.confusion.tolist(),
        }

    def table(self) -> str:
        """A plain-text table: one row per class, then the means and the unmatched ids."""
        width = max(12, *(len(c) for c in self.classes))
        gt_px = self.confusion.sum(1)
        pred_px = self.confusion[:, :-1].sum(0)
        total = max(int(self.confusion.sum()), 1)
        pct = lambda v: "     -" if math.isnan(v) else f"{100 * v:6.2f}"  # noqa: E731
        lines = [f"{'class':<{width}}    IoU    acc   gt %  pred %"]
        for i, c in enumerate(self.classes):
            lines.append(f"{c:<{width}} {pct(self.iou[i])} {pct(self.acc[i])} {100 * gt_px[i] / total:6.2f} "
                         f"{100 * pred_px[i] / total:6.2f}")
        lines.append(f"{'mean':<{width}} {pct(self.miou)} {pct(self.macc)}")
        lines.append(f"mIoU {pct(self.miou).strip()}  mean acc {pct(self.macc).strip()}  pixel acc "
                     f"{pct(self.pixel_acc).strip()}  ({self.n_images} images)")
        if self.confusion[:, -1].any():
            lines.append(f"predictions outside the label set (e.g. 255): {100 * self.invalid_pred_share:.2f}% of "
                         "counted pixels, scored as wrong")
        for what, ids in (("only in the predictions", self.only_in_pred), ("only in the ground truth", self.only_in_gt),
                          ("in neither folder", self.missing)):
            if ids:
                more = f" ... (+{len(ids) - 8})" if len(ids) > 8 else ""
                lines.append(f"{len(ids)} images {what} (not scored): {', '.join(ids[:8])}{more}")
        return "\n".join(lines)


def mask_dir(path: str) -> str:
    """``path`` itself, or its ``SegmentationClass`` folder when ``path`` is a dataset root."""
    sub = os.path.join(path, MASKS)
    if os.path.isdir(sub) and not any(n.lower().endswith(".png") for n in os.listdir(path)):
        return sub
    return path


def _stems(d: str) -> dict[str, str]:
    if not os.path.isdir(d):
        raise ValueError(f"{d}: not a folder")
    return {os.path.splitext(n)[0]: os.path.join(d, n) for n in sorted(os.listdir(d)) if n.lower().endswith(".png")}


@dataclass
class MaskSet:
    """One side of an evaluation: ``masks`` maps each id to its PNG file's path (a folder of
    masks) or to its locator in ``source`` (a tar or parquet dataset)."""

    name: str  # the folder of PNGs, or the dataset and its layout (for messages)
    masks: dict
    source: Source | None = None

    def where(self, sample_id: str) -> str:
        """The file, or the tar member / parquet row, holding ``sample_id``'s mask."""
        m = self.masks[sample_id]
        return m if self.source is None else location(self.source, m)

    def read(self, ids: list[str]) -> dict:
        """id -> (H, W) uint8 labels of ``ids`` (all in ``masks``); a dataset's in file order."""
        if self.source is None:
            return {i: load_mask(self.masks[i]) for i in ids}
        items = sorted((self.masks[i] for i in ids), key=lambda it: it.index)
        return {e.id: load_mask(io.BytesIO(e.files["mask"])) for e in read_packed(self.source, items, kinds=("mask",))}


def _has_pngs(path: str) -> bool:
    return os.path.isdir(path) and any(n.lower().endswith(".png") for n in os.listdir(path))


def _packed(path: str) -> str | None:
    """The packed layout of ``path``; None for a folder holding PNG masks itself (whatever else it holds)."""
    return None if _has_pngs(path) else packed_layout(path)


def masks_name(path: str) -> str:
    """How messages name the masks of ``path``: its mask folder, or ``PATH (webdataset dataset)``."""
    layout = _packed(path)
    return mask_dir(path) if layout is None else f"{path} ({layout} dataset)"


def open_masks(path: str) -> MaskSet:
    """The masks of ``path``: a tar or parquet dataset's committed samples, else the PNG files of
    :func:`mask_dir` ``(path)`` (always for a folder that holds PNG files itself). ValueError
    (one line) for a missing folder or an empty dataset."""
    source = None if _packed(path) is None else open_packed(path)
    if source is not None:
        return MaskSet(masks_name(path), {it.id: it for it in source.items}, source)
    folder = mask_dir(path)
    return MaskSet(folder, _stems(folder))


def evaluate_dirs(pred_dir: str, gt_dir: str, label_set="voc", *, ids=None, batch: int = 64) -> EvalReport:
    """Score every ``<id>.png`` of ``pred_dir`` against ``gt_dir/<id>.png``.

    Args:
        pred_dir, gt_dir: folders of palette/greyscale PNG masks (a VOC dataset root is taken
            as its ``SegmentationClass`` folder), or WebDataset / Parquet datasets (their
            committed samples' masks, paired by id).
        label_set: the classes (its ``ignore_index`` is the ignored ground-truth label).
        ids: score only these ids (e.g. the lines of VOC's ``val.txt``); default: all.
        batch: pairs decoded at a time (a dataset's masks are read in file order within a batch).

    Ids in only one folder are listed in the report, not scored. Raises ValueError if a pair
    of masks differs in size or the ground truth holds a label outside the set.
    """
    if batch < 1:
        raise ValueError(f"`batch` has to be >= 1 but is {batch}")
    ls = get_label_set(label_set)
    pred, gt = open_masks(pred_dir), open_masks(gt_dir)
    wanted = sorted(set(pred.masks) | set(gt.masks)) if ids is None else list(dict.fromkeys(str(i) for i in ids))
    c = ls.num_classes
    cm = np.zeros((c, c + 1), np.int64)
    only_pred, only_gt, missing, pairs = [], [], [], []
    for i in wanted:
        p, g = i in pred.masks, i in gt.masks
        if p and g:
            pairs.append(i)
        else:
            (only_pred if p else only_gt if g else missing).append(i)
    for k in range(0, len(pairs), batch):
        chunk = pairs[k : k + batch]
        pms, gms = pred.read(chunk), gt.read(chunk)
        for i in chunk:
            pm, gm = pms[i], gms[i]
            if pm.shape != gm.shape:
                raise ValueError(f"{pred.where(i)}: the prediction is {pm.shape[0]}x{pm.shape[1]} but the ground truth "
                                 f"{gt.where(i)} is {gm.shape[0]}x{gm.shape[1]} (height x width)")
            try:
                cm += confusion_matrix(pm, gm, c, ls.ignore_index)
            except ValueError as e:
                raise ValueError(f"{gt.where(i)}: {e} (label set {ls.name!r} has {c} classes)") from None
    n = len(pairs)
    return EvalReport.from_confusion(cm, ls.classes, n, only_in_pred=only_pred, only_in_gt=only_gt, missing=missing)


def default_label_set(pred_dir: str) -> "str | dict":
    """The prediction dataset's labelset.json if there is one, else the label set its parquet
    files record, else voc."""
    for root in (pred_dir, os.path.dirname(os.path.normpath(pred_dir))):
        f = os.path.join(root, LABELSET)
        if os.path.isfile(f):
            return f
    return stored_label_set(pred_dir) or "voc"
