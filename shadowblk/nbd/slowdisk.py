"""Test-only: a backing store made slow on purpose, to see the failure predictor notice.

When the environment variable SHADOWBLK_TEST_IO_DELAY_FILE is set (the agent passes its
environment to its `serve` children), the file it names holds a delay in milliseconds that is
added to every read, write and flush of the volume, and to the agent's own latency probe. The
file is re-read at most once a second, so a test can slow a running server down and back up.
Missing, empty or not a number: no delay. Requests then run in the Python loop (the native
loop does its reads and writes in C, where no delay can be added).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from shadowblk.nbd.backend import Backend

DELAY_ENV = "SHADOWBLK_TEST_IO_DELAY_FILE"
REREAD_S = 1.0


class Delay:
    """The delay the file asks for now, in seconds."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.seconds, self._read_at = 0.0, -REREAD_S

    def __call__(self) -> float:
        now = time.monotonic()
        if self.path is not None and now - self._read_at >= REREAD_S:
            self._read_at = now
            try:
                self.seconds = max(0.0, float(self.path.read_text().strip() or 0) / 1000)
            except (OSError, ValueError):
                self.seconds = 0.0
        return self.seconds


def from_environment() -> Delay | None:
    """The delay asked for by the environment; None outside such a test."""
    path = os.environ.get(DELAY_ENV)
    return Delay(path) if path else None


class SlowBackend(Backend):
    """A Backend that sleeps `delay()` before every read, write and flush."""

    delay: Delay

    def pread(self, offset: int, length: int) -> bytes:
        time.sleep(self.delay())
        return super().pread(offset, length)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        time.sleep(self.delay())
        super().pwrite(data, offset)

    def flush(self) -> None:
        time.sleep(self.delay())
        super().flush()


def open_slow(path: Path, size: int | None, read_only: bool, delay: Delay) -> SlowBackend:
    backend = SlowBackend.open(path, size, read_only)
    assert isinstance(backend, SlowBackend)
    backend.delay = delay
    return backend
