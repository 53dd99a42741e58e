"""Small captures and images built on the fly in tmp dirs (no binary fixtures in the repo).

Each scene is a plain background with one rectangle of one class. The capture's features
separate the rectangle from the rest (plus a little seeded noise) and its class maps put the
class inside the rectangle and the background outside, so a labeller should recover the
rectangle; the image shows the same rectangle in another colour.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save as st_save

from pccfast.data.captures import write_capture
from pccfast.data.fileio import save_image
from pccfast.data.labelsets import get_label_set

__all__ = ["Scene", "make_scene", "make_dataset", "write_raw_capture", "good_metadata"]


@dataclass
class Scene:
    id: str
    capture: str  # path of <id>.safetensors
    image: str  # path of the image
    cls: int  # label of the rectangle
    box: tuple[int, int, int, int]  # (top, left, bottom, right) on the capture grid, exclusive ends
    scale: int  # image pixels per grid cell


def _tensors(grid: int, dim: int, k: int, cls: int, box, seed: int):
    g = torch.Generator().manual_seed(seed)
    top, left, bottom, right = box
    inside = torch.zeros(grid, grid)
    inside[top:bottom, left:right] = 1.0  # (h, w)
    pattern = torch.randn(dim, 1, 1, generator=g)
    features = pattern * inside + 0.05 * torch.randn(dim, grid, grid, generator=g)  # (D, h, w)
    class_attention = torch.zeros(k, grid, grid)  # (K, h, w)
    class_attention[0] = 1.0 - inside + 0.01 * torch.rand(grid, grid, generator=g)
    class_attention[cls] = inside + 0.01 * torch.rand(grid, grid, generator=g)
    return features, class_attention


def make_scene(
    captures: str,
    images: str,
    id: str,
    *,
    grid: int = 16,
    scale: int = 4,
    dim: int = 12,
    cls: int = 8,
    seed: int = 0,
    label_set="voc",
    image_ext: str = ".png",
) -> Scene:
    """Write ``captures/<id>.safetensors`` and ``images/<id><image_ext>``."""
    ls = get_label_set(label_set)
    rng = np.random.default_rng(seed)
    top, left = (int(v) for v in rng.integers(1, grid // 3, size=2))
    bottom, right = top + grid // 2, left + grid // 2
    box = (top, left, bottom, right)
    features, class_attention = _tensors(grid, dim, ls.num_classes, cls, box, seed)
    cap = os.path.join(captures, f"{id}.safetensors")
    write_capture(
        cap, features, class_attention, label_set=ls, prompt=f"a photo of a {ls.classes[cls]}",
        classes=[ls.classes[cls]], seed=seed, model="tiny", steps=2,
    )
    size = grid * scale
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (40, 120, 200)
    img[top * scale : bottom * scale, left * scale : right * scale] = (220, 60, 30)
    os.makedirs(images, exist_ok=True)
    path = os.path.join(images, f"{id}{image_ext}")
    save_image(path, img)
    return Scene(id, cap, path, cls, box, scale)


def make_dataset(root: str, n: int = 3, **kw) -> tuple[str, str, list[Scene]]:
    """``n`` scenes with ids 0..n-1 under ``root/captures`` and ``root/images``."""
    captures, images = os.path.join(root, "captures"), os.path.join(root, "images")
    scenes = [make_scene(captures, images, str(i), seed=i, cls=1 + (7 * i) % 20, **kw) for i in range(n)]
    return captures, images, scenes


def good_metadata(label_set="voc", **changes) -> dict:
    ls = get_label_set(label_set)
    meta = {
        "format_version": "1",
        "label_set": ls.name,
        "label_classes": json.dumps(list(ls.classes)),
        "prompt": "a cat",
        "classes": json.dumps(["cat"]),
        "seed": "3",
        "model": "tiny",
        "steps": "2",
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def write_raw_capture(path: str, tensors: dict, metadata: dict) -> str:
    """Write a safetensors file as given, bypassing ``write_capture``'s checks (for bad inputs)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    return path
