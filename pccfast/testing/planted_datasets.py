"""Planted datasets: VOC-layout datasets of seeded random samples, for the layout tests and
benchmarks (``export``, shards, parquet), written through the real writer and manifest.

Sample ``i`` of seed ``s`` has a noise-and-gradient RGB image (a JPEG of realistic size),
a mask of a few rectangles of label values with a band of 255 (uncertain) around each, and a
record shaped like generate's (id, index, prompt, classes, seed, model, steps, size,
seconds). ``blocky_every`` gives every n-th sample a blocky mask too.
"""
from __future__ import annotations

import numpy as np

from pccfast.core.labelset import as_label_set
from pccfast.data.manifest import Manifest
from pccfast.data.writer import SampleWriter

__all__ = ["planted_sample", "write_planted_voc"]


def planted_sample(i: int, size: int = 64, seed: int = 0, num_classes: int = 21):
    """``(image (size, size, 3) uint8, mask (size, size) uint8, classes)`` of sample ``i``."""
    rng = np.random.default_rng([seed, i])
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1), (xx + yy) * 127 // max(size - 1, 1)],
                    -1)
    image = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    labels = rng.choice(np.arange(1, num_classes), size=int(rng.integers(1, 4)), replace=False)
    for label in labels:
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 8, size // 2, 2)
        mask[max(y0 - 2, 0): y0 + h + 2, max(x0 - 2, 0): x0 + w + 2] = 255
        mask[y0: y0 + h, x0: x0 + w] = label
    return image, mask, [int(v) for v in labels]


def write_planted_voc(out: str, n: int, *, size: int = 64, seed: int = 0, blocky_every: int = 0,
                      label_set: str = "voc") -> list[str]:
    """Write ``n`` planted samples as a finished VOC dataset into ``out``; returns the ids."""
    ls = as_label_set(label_set)
    store = Manifest(out, ls, defining={"model": "planted", "seed": f"{seed} + index", "height": size, "width": size})
    writer = SampleWriter(out, ls, save_blocky=blocky_every > 0)
    ids = []
    for i in range(n):
        image, mask, labels = planted_sample(i, size, seed, ls.num_classes)
        blocky = mask[::4, ::4].repeat(4, 0).repeat(4, 1) if blocky_every and i % blocky_every == 0 else None
        sid = f"{i:06d}"
        record = dict(id=sid, index=i, prompt=f"a planted scene {i}", classes=[ls.classes[v] for v in labels],
                      seed=seed + i, model="planted", steps=None, height=size, width=size, seconds=0.001)
        store.commit(writer.write_files(sid, image, mask, blocky, record=record))
        ids.append(sid)
    store.finalize()
    return ids
