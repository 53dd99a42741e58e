"""Every resampling pccfast does, in one place (the reference's semantics).

STUB: the helper building this module replaces the body with kornia.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["resize"]


def resize(x: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resample the last two dimensions of ``x: (*, H, W)`` to ``size = (h, w)``.

    ``mode``: "bilinear" (align_corners=False, no antialiasing) or "nearest" (torch's
    nearest: source index floor(i * H / h)).
    """
    lead = x.shape[:-2]
    y = x.reshape(-1, 1, *x.shape[-2:])
    if mode == "bilinear":
        y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
    elif mode == "nearest":
        y = F.interpolate(y, size=tuple(size), mode="nearest")
    else:
        raise ValueError(f"`mode` has to be 'bilinear' or 'nearest' but is {mode!r}")
    return y.reshape(*lead, *y.shape[-2:])
