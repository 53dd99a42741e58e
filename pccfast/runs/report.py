"""The one report type of every run."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RunReport", "BatchStat"]


@dataclass
class BatchStat:
    """Timings of one finished batch (seconds; ``transfer`` = worker return -> driver receipt)."""

    size: int  # items in the batch
    run: float  # the whole step in the worker (read, compute, write)
    write: float  # of which writing files
    transfer: float  # result travelling back to the driver, plus the driver noticing it (Ray)
    worker: int  # worker slot (0 for the local loop)


@dataclass
class RunReport:
    """What a run did. ``failures`` holds one ``(id, one-line message)`` per item that failed."""

    written: list = field(default_factory=list)  # ids finished in this run
    skipped: list = field(default_factory=list)  # ids already finished before (resume)
    failures: list = field(default_factory=list)  # (id, message)
    seconds: float = 0.0  # wall time of the run
    retried: int = 0  # batches run again (item by item after a failure, or after a worker died)
    workers: int = 0  # Ray actors started (0: the local loop)
    restarts: int = 0  # Ray actor deaths seen
    connect_seconds: float = 0.0  # ray.init (start or join)
    startup_seconds: float = 0.0  # actors created -> first actor ready (process start + model load)
    load_seconds: list = field(default_factory=list)  # per worker start: the step's construction
    batch_stats: list = field(default_factory=list)  # BatchStat per finished batch

    @property
    def done(self) -> int:
        return len(self.written)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failed_ids(self) -> list:
        return [i for i, _ in self.failures]

    @property
    def images_per_second(self) -> float:
        return len(self.written) / self.seconds if self.seconds > 0 else 0.0

    def summary(self, what: str, out: str) -> str:
        """``N <what> written, M already done, F failed in S s (R images/s) -> OUT``."""
        return (f"{len(self.written)} {what} written, {len(self.skipped)} already done, {len(self.failures)} failed "
                f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s) -> {out}")
