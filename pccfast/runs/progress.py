"""The one progress bar of every run (generate, relabel; local or on Ray)."""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """A tqdm bar on stderr that counts items, shows the rate and what was skipped, and
    prints log lines above itself. ``enabled=False`` keeps the log lines and drops the bar."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, skipped: int = 0):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, file=sys.stderr)
        self.skipped = skipped
        self.done = 0
        self.t0 = time.perf_counter()
        self.extra = ""
        self._postfix()

    def _postfix(self) -> None:
        parts = []
        if self.done:
            parts.append(f"{self.done / max(time.perf_counter() - self.t0, 1e-9):.2f} img/s")
        if self.skipped:
            parts.append(f"{self.skipped} already done")
        if self.extra:
            parts.append(self.extra)
        self.bar.set_postfix_str(", ".join(parts), refresh=False)

    def advance(self, n: int, *, finished: int | None = None, extra: str | None = None) -> None:
        """``n`` items are settled (written or failed); ``finished`` of them were written."""
        self.done += n if finished is None else finished
        if extra is not None:
            self.extra = extra
        self._postfix()
        self.bar.update(n)

    def log(self, line: str) -> None:
        """One line on stderr above the bar (the bar is redrawn below it)."""
        self._tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
