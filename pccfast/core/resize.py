"""Every resampling pccfast does, in one place, with the reference's semantics.

``resize`` is ``kornia.geometry.transform.resize`` with its options pinned to what the
reference computes: ``"bilinear"`` is ``F.interpolate(mode="bilinear", align_corners=False)``
without antialiasing (``"bicubic"`` likewise, for the Dataset Diffusion labeller), ``"nearest"`` is ``F.interpolate(mode="nearest")`` (source index
``floor(i * H / h)``; upscaling by a whole factor ``f`` repeats every pixel ``f`` times, like
``repeat_interleave``). Results are bit-identical to ``F.interpolate`` on the same tensor.

Two details keep them so:

* a 4-D input ``(B, C, H, W)`` is handed over as it is, never refolded: torch's CPU bilinear
  kernel rounds differently (by up to 1 ulp) for ``(B, C)`` and ``(B * C, 1)`` planes, so a
  refold would change today's results. Other ranks are folded the way kornia folds them:
  ``(H, W) -> (1, 1, H, W)``, ``(C, H, W) -> (1, C, H, W)``, ``(*, C, H, W) -> (prod(*), C, H, W)``.
* upscaling by whole factors with "nearest" (every use in the labeller: layer grids to the
  labelling grid, the grid to the image) is a broadcast copy, written straight into ``out``
  when one is given: the same values as ``repeat_interleave`` (and as ``F.interpolate`` for
  the power-of-two factors of SD), without an interpolation kernel or an intermediate tensor.
* ``F.interpolate`` takes floating-point and uint8 tensors only. For "nearest" on any other
  dtype (int64 labels, bool masks, ...) the rows and columns that kornia's nearest picks are
  read off two float32 index vectors and gathered, which keeps the dtype and the values.
"""
from __future__ import annotations

from typing import Sequence

import torch
from kornia.geometry.transform import resize as _kornia_resize
from torch import Tensor

from pccfast.core.checks import check_pair, check_tensor

__all__ = ["resize", "MODES"]

MODES = ("bilinear", "bicubic", "nearest")


def _check(x: object, size: object, mode: object) -> tuple[int, int]:
    """Validate the arguments of ``resize``; return ``size`` as a pair of ints."""
    check_tensor(x, "x")  # a tensor
    if x.ndim < 2:
        raise ValueError(f"`x` has to have at least 2 dimensions (*, H, W) but has shape {tuple(x.shape)}")
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"`x` has to have H and W of at least 1 but has shape {tuple(x.shape)}")
    if mode not in MODES:
        raise ValueError(f"`mode` has to be one of {MODES} but is {mode!r}")
    if not isinstance(size, Sequence):
        raise ValueError(f"`size` has to be a pair of positive ints (h, w) but is {size!r}")
    h, w = check_pair(size, "size")
    if x.is_complex():
        raise TypeError(f"`x` has to be a real tensor but has dtype {x.dtype}")
    if mode == "bilinear" and not (x.is_floating_point() or x.dtype == torch.uint8):
        raise TypeError(f"`x` has to be floating point or uint8 for mode 'bilinear' but has dtype {x.dtype}")
    if mode == "bicubic" and not x.is_floating_point():
        raise TypeError(f"`x` has to be floating point for mode 'bicubic' but has dtype {x.dtype}")
    return h, w


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """The source indices (n_out,) int64 that nearest resampling reads along one axis."""
    src = torch.arange(n_in, device=device, dtype=torch.float32).view(n_in, 1)  # (n_in, 1), exact below 2**24
    return _kornia_resize(src, (n_out, 1), interpolation="nearest").view(n_out).long()  # (n_out,)


def resize(x: Tensor, size: tuple[int, int], mode: str = "bilinear", *, out: Tensor | None = None) -> Tensor:
    """Resample the last two dimensions of ``x`` to ``size``.

    Args:
        x: (*, H, W) floating point or uint8 for "bilinear"; any real dtype for "nearest".
        size: (h, w), positive ints.
        mode: "bilinear" or "bicubic" (align_corners=False, no antialiasing) or "nearest" (torch's
            nearest: source index floor(i * H / h)).
        out: optional (*, h, w) tensor to write the result into (it may be a view, e.g. a
            channel slice of a larger tensor); it is returned.

    Returns:
        (*, h, w), the dtype and device of ``x`` (a new tensor, also when ``size == (H, W)``),
        or ``out``.

    Raises:
        TypeError: ``x`` is not a tensor, or its dtype does not suit ``mode``.
        ValueError: ``x`` has fewer than 2 dimensions or an empty H or W, ``size`` is not two
            positive ints, or ``mode`` is unknown.
    """
    h, w = _check(x, size, mode)
    if out is not None and tuple(out.shape) != (*x.shape[:-2], h, w):
        raise ValueError(f"`out` has to have shape {(*x.shape[:-2], h, w)} but has shape {tuple(out.shape)}")
    big_h, big_w = x.shape[-2:]
    if mode == "nearest" and h % big_h == 0 and w % big_w == 0:  # whole factors: a broadcast copy
        fh, fw = h // big_h, w // big_w
        src = x[..., :, None, :, None].expand(*x.shape[:-2], big_h, fh, big_w, fw)  # (*, H, fh, W, fw)
        if out is None:
            out = x.new_empty(*x.shape[:-2], h, w)
        out.unflatten(-1, (big_w, fw)).unflatten(-3, (big_h, fh)).copy_(src)
        return out
    if out is not None:
        return out.copy_(resize(x, (h, w), mode))
    if mode in ("bilinear", "bicubic"):
        return _kornia_resize(x, (h, w), interpolation=mode, align_corners=False, antialias=False)
    if x.is_floating_point() or x.dtype == torch.uint8:
        return _kornia_resize(x, (h, w), interpolation="nearest", antialias=False)
    rows = _nearest_index(x.shape[-2], h, x.device)  # (h,)
    cols = _nearest_index(x.shape[-1], w, x.device)  # (w,)
    return x.index_select(-2, rows).index_select(-1, cols)  # (*, h, w)
