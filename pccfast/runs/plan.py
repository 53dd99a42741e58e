"""Which items a run does: its shard of the work list, what resume leaves, and the batches.

Items are any objects with ``id`` (str) and ``index`` (position in the full work list:
prompt i of the prompt file, capture i in id order). Sharding is by ``index``, so a shard's
items never depend on the batch size or on what is already done.
"""
from __future__ import annotations

__all__ = ["parse_shard", "select_shard", "pending", "batches"]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> (I, N); None stays None; ValueError naming ``--shard`` otherwise."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"`--shard` has to be I/N (e.g. 0/4) but is {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"`--shard` I/N needs 0 <= I < N but is {text!r}")
    return i, n


def select_shard(items: list, shard: tuple[int, int] | None) -> list:
    """The deterministic I-th of N parts of ``items`` by position (``index % N == I``)."""
    if shard is None:
        return list(items)
    i, n = shard
    return [e for e in items if e.index % n == i]


def pending(items: list, store) -> tuple[list, list]:
    """Record the run's plan in ``store`` and split ``items`` into (to do, already done ids)."""
    store.write_plan([e.id for e in items])
    done = store.done_ids()
    return [e for e in items if e.id not in done], [e.id for e in items if e.id in done]


def batches(items: list, size: int) -> list[list]:
    """Consecutive batches of ``size`` items (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"`batch` has to be at least 1 but is {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]
