"""Milliseconds per step of a multi-step operation (a switchover, a promotion), for its record."""

from __future__ import annotations

import time


class Timings:
    """Milliseconds per step, in the order they ran."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self.ms: dict[str, float] = {}

    def mark(self, step: str) -> None:
        now = time.monotonic()
        self.ms[step] = round((now - self._last) * 1000, 3)
        self._last = now

    def total(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 3)
