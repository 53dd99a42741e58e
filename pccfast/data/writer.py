"""The worker's side of a dataset: one sample's files, each written atomically, the mask last."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pccfast.core.labelset import LabelSet
from pccfast.data.fileio import atomic_write_bytes, check_id, save_image, save_mask_png
from pccfast.data.layout import sample_paths

__all__ = ["SampleWriter"]


@dataclass
class SampleWriter:
    """Writes samples into dataset ``out`` (never commits: that is the driver's
    :class:`~pccfast.data.manifest.Manifest`)."""

    out: str
    label_set: LabelSet
    save_blocky: bool = False
    save_captures: bool = False
    jpeg_quality: int = 95

    def write_files(
        self,
        sample_id: str,
        image: np.ndarray,
        mask: np.ndarray,
        blocky: np.ndarray | None = None,
        capture: dict | None = None,
        *,
        record: dict | None = None,
        extra_masks: dict | None = None,
    ) -> dict | None:
        """Write one sample's files atomically (image (H, W, 3) uint8, mask/blocky (H, W) uint8).

        The mask goes last so that a present mask implies the other files are complete.
        ``extra_masks``: more (H, W) uint8 masks by their ``layout.sample_paths`` key (``mask_pcc``,
        ``mask_dd``: each labeller's own mask with ``--save-all-labelers``).
        Returns ``record`` as the manifest commits it (as given: a VOC sample's place is its id),
        like :class:`~pccfast.data.shards.ShardWriter`.
        """
        check_id(sample_id)
        p = sample_paths(self.out, sample_id)
        save_image(p["image"], image, quality=self.jpeg_quality)
        pal = self.label_set.flat_palette()
        if self.save_blocky and blocky is not None:
            save_mask_png(p["blocky"], blocky, pal)
        if self.save_captures and capture is not None:
            from pccfast.data.captures import write_capture

            write_capture(p["capture"], **capture)
        for key, extra in (extra_masks or {}).items():
            save_mask_png(p[key], extra, pal)
        save_mask_png(p["mask"], mask, pal)
        return record

    def end_batch(self) -> None:
        """Nothing to do: every file was written whole (the tar writer completes its archive here)."""

    def write_encoded(self, sample_id: str, files: dict) -> None:
        """Write one sample's files as given (``image``, ``mask``, optional ``blocky``, ``capture``:
        encoded bytes, copied as they are: ``export`` re-encodes nothing), the mask last."""
        check_id(sample_id)
        p = sample_paths(self.out, sample_id)
        for key in ("image", "blocky", "capture", "mask"):
            if files.get(key) is not None:
                atomic_write_bytes(p[key], files[key])
