"""A one-line progress bar on stderr, for the command line's longer runs."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts steps toward ``total``; draws only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done = max(total, 1), 0
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def step(self, label: str = "", count: int = 1) -> None:
        self.done += count
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(30 * frac)
        elapsed = time.perf_counter() - self.t0
        sys.stderr.write(f"\r[{bar:<30}] {100 * frac:5.1f}% {elapsed:6.1f}s {label:<30}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
