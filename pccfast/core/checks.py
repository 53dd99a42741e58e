"""Input checks and local random generators shared by the labeller core.

``check_tensor`` is the one shape/dtype check of the core: every public function of
``pca``, ``kmeans``, ``components``, ``blocky``, ``refine`` and ``labeller`` validates its
tensors through it, so the messages read the same everywhere.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["check_tensor", "check_pair", "local_generator", "cpu_tuned", "device_code_paths"]

_DEVICE_PATHS = False  # device_code_paths() in force


def cpu_tuned(device: Union[str, torch.device]) -> bool:
    """Whether the CPU-tuned code path runs for tensors on ``device``: on the CPU, unless
    :func:`device_code_paths` is in force. Every CPU/accelerator branch of the core asks this.

    The CPU paths cut work into chunks, vectorise an argmin along the contiguous axis, compact
    arrays once (a host read costs nothing there) and reuse kept random numbers; the device
    paths do none of that. Both give the same results."""
    return torch.device(device).type == "cpu" and not _DEVICE_PATHS


@contextlib.contextmanager
def device_code_paths():
    """Run the accelerator code paths on the CPU inside the ``with`` block (not thread-safe):
    to count the ops and host reads a GPU would see (``benchmarks/bench_syncs.py``) and to test
    the GPU-only branches against the CPU ones where no GPU is at hand."""
    global _DEVICE_PATHS
    saved, _DEVICE_PATHS = _DEVICE_PATHS, True
    try:
        yield
    finally:
        _DEVICE_PATHS = saved


def check_tensor(
    x: object,
    name: str,
    ndim: Union[int, Sequence[int], None] = None,
    *,
    floating: bool = False,
    integer: bool = False,
    finite: bool = False,
    batch: Optional[int] = None,
    min_size: Optional[Sequence[Optional[int]]] = None,
) -> Tensor:
    """Check a tensor argument and return it unchanged.

    Args:
        x: the argument.
        name: its parameter name (used in the message).
        ndim: required number of dimensions (an int or a collection of allowed ints).
        floating: require a floating-point dtype.
        integer: require an integer (or bool) dtype.
        finite: require every element to be finite (no NaN or inf; floating dtypes only).
        batch: required size of dimension 0.
        min_size: per-dimension minimum sizes (``None`` entries are not checked).

    Raises:
        TypeError: ``x`` is not a tensor or has the wrong dtype kind.
        ValueError: wrong number of dimensions, batch size, size or non-finite values.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` has to be a torch.Tensor but is {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"`{name}` has to have {want} dimensions but has shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"`{name}` has to be a floating-point tensor but has dtype {x.dtype}")
    if integer and (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"`{name}` has to be an integer tensor but has dtype {x.dtype}")
    if batch is not None and (x.ndim == 0 or x.shape[0] != batch):
        raise ValueError(
            f"`{name}` has to have batch size {batch} (dimension 0) but has shape {tuple(x.shape)}"
        )
    if min_size is not None:
        for dim, lo in enumerate(min_size):
            if lo is not None and dim < x.ndim and x.shape[dim] < lo:
                raise ValueError(
                    f"`{name}` has to have at least {lo} entries in dimension {dim} "
                    f"but has shape {tuple(x.shape)}"
                )
    # one summing pass: a NaN or inf anywhere makes the sum NaN or inf; only then (or when
    # finite values overflow the sum) look element by element
    if finite and x.is_floating_point() and x.numel() and not bool(torch.isfinite(x.sum())):
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"`{name}` has to be finite but holds {bad} NaN or inf values")
    return x


def check_pair(value: object, name: str) -> tuple[int, int]:
    """``value`` as an (h, w) pair of positive ints (not bools), else a ValueError naming ``name``."""
    try:
        if isinstance(value, bool) or len(value) != 2 or any(isinstance(v, bool) for v in value):
            raise TypeError
        h, w = operator.index(value[0]), operator.index(value[1])
    except TypeError:
        h = w = 0
    if h < 1 or w < 1:
        raise ValueError(f"`{name}` has to be a pair of positive ints (h, w) but is {value!r}")
    return h, w


def local_generator(
    generator: Optional[torch.Generator], seed: int, device: torch.device
) -> torch.Generator:
    """The caller's generator, or a fresh CPU generator seeded with ``seed``, whatever ``device``.

    Random tensors are drawn on the generator's own device and then moved to the data's
    (see ``randn``/``rand`` usage in the core). The default is a CPU generator on every device:
    the k-means++ and PCA draws are then the same numbers on a GPU as on the CPU, so the same
    seed gives the same masks on any device, up to float rounding (CUDA generators draw other
    numbers from the same seed). ``device`` is kept for the callers' signature.
    """
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` has to be a torch.Generator but is {type(generator).__name__}")
        return generator
    torch.device(device)  # still checked: a bad device is the caller's error, here as before
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g
