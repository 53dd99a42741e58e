"""Implementations behind the labeller's operations, and the one place that picks among them.

``OPERATIONS`` is the table: for every operation the backend names it accepts, the C kernel
behind ``"native"`` and the setting that chooses it (for messages). ``resolve`` turns a
requested backend into the one that runs, with the same rules for every operation:

- ``"auto"``: ``"native"`` for a CPU tensor when the kernel builds (and the input ``fits``
  it), else ``"torch"``; ``PCCFAST_NATIVE=0`` disables the kernels, so ``"auto"`` is
  ``"torch"``; a kernel that does not build warns once.
- ``"native"``: checked: a tensor off the CPU is a ``ValueError`` naming the setting, a
  kernel that cannot be built (or ``PCCFAST_NATIVE=0``) raises ``NativeUnavailable``.
- any other accepted name (``"torch"``, ``"cuml"``, ``"cupy"``) is itself.

Modules: ``native`` (build, cache and load the C kernels), ``kernels`` (their ctypes
bindings), ``rapids`` (optional cuML and CuPy). This package imports nothing from
``pccfast.core``; the core imports it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pccfast.backends import native
from pccfast.backends.native import NativeUnavailable

__all__ = ["Operation", "OPERATIONS", "BACKENDS", "NativeUnavailable", "resolve"]


@dataclass(frozen=True)
class Operation:
    """One operation's backends."""

    backends: tuple[str, ...]  # accepted names, "auto" first
    kernel: str  # the C kernel (kernels/<kernel>.c) that "native" runs
    option: str  # the parameter or setting that chooses the backend, named in messages


OPERATIONS: dict[str, Operation] = {
    "kmeans": Operation(("auto", "torch", "native", "cuml"), "kmeans", "backend"),
    "components": Operation(("auto", "torch", "native", "cupy"), "components", "backend"),
    "cleanup": Operation(("auto", "torch", "native"), "morphology", "cleanup_backend"),
    "features": Operation(("auto", "torch", "native"), "features", "backend"),
}

BACKENDS: dict[str, tuple[str, ...]] = {op: spec.backends for op, spec in OPERATIONS.items()}


def resolve(op: str, backend: str, x: Tensor, *, fits: bool = True) -> str:
    """The backend that runs operation ``op`` when ``backend`` is asked for with input ``x``.

    Args:
        op: a key of ``OPERATIONS`` ("kmeans", "components", "cleanup", "features").
        backend: one of ``OPERATIONS[op].backends``.
        x: the input tensor (only its device is read).
        fits: whether the kernel takes this input; False sends "auto" to "torch" (an explicit
            "native" is the caller's to refuse).

    Returns:
        "native", "torch" or the optional backend's own name.

    Raises:
        ValueError: an unknown ``op`` or ``backend``, or "native" with ``x`` off the CPU.
        NativeUnavailable: "native" and the kernel cannot be built or is disabled.
    """
    spec = OPERATIONS.get(op)
    if spec is None:
        raise ValueError(f"`op` has to be one of {', '.join(map(repr, OPERATIONS))} but is {op!r}")
    if backend not in spec.backends:
        raise ValueError(f"`{spec.option}` has to be one of {', '.join(map(repr, spec.backends))} but is {backend!r}")
    if backend == "auto":
        return "native" if x.device.type == "cpu" and fits and native.available(spec.kernel) else "torch"
    if backend == "native":
        if x.device.type != "cpu":
            raise ValueError(f"{op} backend 'native' runs on the CPU but the input is on {x.device}; "
                             f"use {spec.option}='auto' or 'torch'")
        native.load(spec.kernel)  # raises NativeUnavailable with the reason
    return backend
