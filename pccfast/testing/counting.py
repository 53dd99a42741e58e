"""Count aten ops and host synchronisations with a ``TorchDispatchMode`` (tests, benchmarks).

On a GPU every op that needs a value on the host (``.item()``, ``bool(tensor)``, an output
whose shape depends on the data) stalls the device until the queue drains. The counter sees
every aten call below autograd, so it counts the same ops on the CPU as a GPU would run,
and a test can bound a stage's synchronisations without a GPU.

Usage::

    with OpCounter() as c:
        connected_components(labels, backend="torch")
    c.total_syncs, c.total_ops, c.total_launches  # ints; per section: c.syncs, c.ops, c.launches

``ops`` counts every aten call, ``launches`` those that can start a device kernel: not views
(``view``, ``expand``, ``select``, ``transpose``, ... change a tensor's metadata only) and not
bare allocations (``empty``). On a GPU each launch costs a few microseconds of host time
whatever its size, which is what the op budget is about.

``.tolist()`` and ``.cpu()`` of a CPU tensor read memory without an aten op, so they are
invisible here; the core reads values back with ``.to("cpu", copy=True)``, which is counted.
``section(name)`` attributes the ops to a named stage (nested: the innermost name wins).
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "NO_KERNEL_OPS", "is_sync", "launches_kernel", "OpCounter"]

# ops whose result needs the host to wait for the device: a scalar on the host or an output
# shape that depends on the values
SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.nonzero_static", "aten.bincount",
    "aten.masked_select", "aten.equal", "aten.is_nonzero", "aten._unique", "aten._unique2",
    "aten.unique_dim", "aten.unique_consecutive", "aten.unique_dim_consecutive",
})


# not marked as views in their schemas but metadata or allocation only
NO_KERNEL_OPS = frozenset({
    "aten._unsafe_view", "aten._reshape_alias", "aten.empty", "aten.empty_like", "aten.empty_strided",
    "aten.new_empty", "aten.new_empty_strided",
})


def launches_kernel(func, packet: str) -> bool:
    """Whether the aten op ``func`` (overload packet name ``packet``) can start a kernel."""
    return not func.is_view and packet not in NO_KERNEL_OPS


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def is_sync(packet: str, args: tuple, kwargs: Optional[dict] = None) -> bool:
    """Whether the aten op ``packet`` (e.g. ``"aten.index"``) called with ``args`` syncs.

    Besides ``SYNC_OPS``: indexing with a bool mask (``aten.index``, ``aten.index_put``: the
    mask's true count sets the shape), ``repeat_interleave`` with a tensor of repeats and a
    copy to the host.
    """
    if packet in SYNC_OPS:
        return True
    if packet in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        return len(args) > 1 and _has_bool_index(args[1])
    if packet == "aten._to_copy":  # a copy to the host (``.to("cpu", copy=True)``; ``.tolist()``
        # and ``.cpu()`` of a CPU tensor never reach the dispatcher, so the core reads values
        # back with an explicit copy)
        device = kwargs.get("device") if kwargs else None
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        return device is not None and torch.device(device).type == "cpu" and src is not None
    if packet == "aten.copy_":  # into a host tensor from a device tensor
        return (len(args) > 1 and isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.Tensor)
                and args[0].device.type == "cpu" and args[1].device.type != "cpu")
    if packet == "aten.repeat_interleave":
        return len(args) > 0 and isinstance(args[0], torch.Tensor) and (
            len(args) == 1 or isinstance(args[1], torch.Tensor))
    return False


class OpCounter(TorchDispatchMode):
    """Counts aten ops and host synchronisations per section.

    Attributes:
        ops: Counter of ops per section name ("" outside any section).
        launches: Counter of the ops that can start a kernel (``launches_kernel``) per section.
        syncs: Counter of synchronising ops per section name.
        sync_ops: Counter of (section, op name) for the synchronising ops.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.launches: Counter = Counter()
        self.syncs: Counter = Counter()
        self.sync_ops: Counter = Counter()
        self._stack: list[str] = [""]

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Attribute the ops inside to ``name``."""
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    stage = section  # the benchmarks' name for it

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = self._stack[-1]
        packet = str(func.overloadpacket)
        if not packet.startswith("aten."):
            packet = "aten." + packet
        self.ops[name] += 1
        if launches_kernel(func, packet):
            self.launches[name] += 1
        if is_sync(packet, args, kwargs):
            self.syncs[name] += 1
            self.sync_ops[(name, packet)] += 1
        return func(*args, **(kwargs or {}))
