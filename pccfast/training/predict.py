"""``--predict``: a trained checkpoint's masks for a folder of images, as palette PNGs.

A step of the run engine (:func:`pccfast.runs.engine.run_local`) over the images: ``prepare``
reads them, ``process`` runs the model (argmax of the logits at the image's own size), ``write``
writes ``OUT/SegmentationClass/<id>.png`` through the relabel mask store, so ``python -m
pccfast.evaluate OUT GT`` scores them and a re-run resumes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from pccfast.data.fileio import check_id, load_image
from pccfast.data.layout import IMAGE_EXTS
from pccfast.data.masks import MaskStore, MaskWriter, images_folder
from pccfast.runs.engine import Prepared, run_local
from pccfast.runs.report import RunReport
from pccfast.training.datasets import normalize
from pccfast.training.loop import load_checkpoint_model

__all__ = ["ImageItem", "find_images", "PredictStep", "predict"]


@dataclass(frozen=True)
class ImageItem:
    """One image to segment."""

    id: str
    index: int
    path: str


def find_images(images: str) -> list[ImageItem]:
    """The images of ``images`` (or of its ``JPEGImages/`` when it is a dataset), sorted by id;
    ValueError (one line) for a missing or empty folder."""
    if not os.path.isdir(images):
        raise ValueError(f"`IMAGES` {images!r} is not a folder")
    folder = images_folder(images)
    names: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS and not name.startswith(".") and stem not in names:
            names[stem] = name
    if not names:
        raise ValueError(f"`IMAGES` {folder!r} holds no image (.jpg, .jpeg or .png)")
    return [ImageItem(check_id(s), i, os.path.join(folder, names[s])) for i, s in enumerate(sorted(names))]


class PredictStep:
    """The engine's step: read images, segment them, write masks."""

    name = "predict"

    def __init__(self, model: torch.nn.Module, device: torch.device, writer: MaskWriter):
        self.model, self.device, self.writer = model, device, writer

    def prepare(self, items: list) -> Prepared:
        ok, data, failures = [], [], []
        for item in items:
            try:
                data.append(torch.from_numpy(np.array(load_image(item.path))).permute(2, 0, 1))
                ok.append(item)
            except (OSError, ValueError) as e:
                failures.append((item.id, f"{item.path}: {e}"))
        return Prepared(ok, data, failures)

    @torch.no_grad()
    def process(self, prepared: Prepared) -> list[np.ndarray]:
        masks = []
        for image in prepared.data:  # images of any size: one forward each
            x = normalize(image.to(self.device))[None]  # (1, 3, H, W)
            masks.append(self.model(x)["out"].argmax(1)[0].to(torch.uint8))  # (H, W)
        return [m.cpu().numpy() for m in masks]

    def write(self, prepared: Prepared, result: list[np.ndarray]):
        records, failures = [], []
        for item, mask in zip(prepared.items, result):
            try:
                self.writer.write(item.id, mask)
                records.append({"id": item.id})
            except OSError as e:
                failures.append((item.id, f"{item.id}: {e}"))
        return records, failures


def predict(checkpoint: str, images: str, out: str, *, device: torch.device | str = "cpu", batch: int = 4,
            progress: bool = True, overwrite: bool = False) -> RunReport:
    """Segment every image of ``images`` with ``checkpoint``'s model into ``out``'s
    ``SegmentationClass/`` (palette PNGs in the checkpoint's label set, which ``out``'s
    ``labelset.json`` records). Returns the engine's report."""
    device = torch.device(device)
    items = find_images(images)
    model, _, label_set = load_checkpoint_model(checkpoint, device)
    store = MaskStore(out, label_set, overwrite=overwrite)
    writer = MaskWriter(out, label_set)
    return run_local(lambda dev: PredictStep(model, device, writer), items, store, batch=batch,
                     device=str(device), progress=progress, desc="predict")
