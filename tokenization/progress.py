"""Progress lines for phases that can take minutes: ``<what> done/total (rate items/s, ETA s)``, at most one line
per ``every`` seconds (readable in a non-TTY log) plus the last one. Pure: no engine imports."""

from __future__ import annotations

import time
from typing import Callable


class Progress:
    """``p = Progress("embedded", n, log); p.add(rows)`` ... prints ``embedded 512/1000 items (85.3 items/s, ETA 6 s)``."""

    def __init__(self, what: str, total: int, log: Callable[[str], None] | None, unit: str = "items",
                 every: float = 10.0):
        self.what, self.total, self.log, self.unit, self.every = what, int(total), log, unit, every
        self.done = 0
        self.t0 = self.last = time.time()

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

    @property
    def rate(self) -> float:
        return self.done / max(self.seconds, 1e-9)

    def add(self, n: int) -> None:
        self.done += int(n)
        now = time.time()
        if self.log and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            eta = (self.total - self.done) / self.rate if self.rate > 0 else float("inf")
            self.log(f"{self.what} {self.done}/{self.total} {self.unit} ({self.rate:.1f} {self.unit}/s, "
                     f"ETA {eta:.0f} s)")
