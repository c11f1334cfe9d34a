"""A token bucket: keeps a scrub's reads under a byte rate so it never starves the volume's I/O."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """Grants bytes at `rate` per second with bursts up to `burst` bytes.

    `take(n)` sleeps until n bytes are available; a request larger than the burst is granted
    once the bucket is full and leaves it in debt, so large reads keep the long-run rate.
    Thread-safe: concurrent readers share one rate.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate {rate} must be positive (bytes per second)")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self, nbytes: int) -> None:
        """Block until `nbytes` may be spent, then spend them."""
        need = min(float(nbytes), self.burst)
        with self._lock:
            self._refill()
            if self._tokens < need:
                self._sleep((need - self._tokens) / self.rate)
                self._refill()  # any shortfall left by rounding stays as debt for the next take
            self._tokens -= nbytes
