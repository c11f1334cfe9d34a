"""The guest-side writer and helpers shared by the switchover test (guest_switch.py) and the
pause benchmark (tools/bench/dm_pause_guest.py), run in the host's userland inside the guest.

The writer is QD1, O_DIRECT, 4 KiB blocks, each headed "pass P block B"; it takes every write's
start and end time here in the guest, so a swap's pause is seen as the writes that straddle it.
"""

import json
import mmap
import os
import threading
import time
import urllib.request
from pathlib import Path

BLOCK = 4096
WINDOW = 256  # blocks rewritten pass after pass


def pattern(p: int, b: int) -> bytes:
    return f"pass {p} block {b}".ljust(BLOCK - 1).encode() + b"\n"


class Writer(threading.Thread):
    """Rewrites the window until stopped; keeps every write's (start, end) and the errors."""

    def __init__(self, device: str) -> None:
        super().__init__(daemon=True)
        self.fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        self.buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
        self.stop = threading.Event()
        self.times: list[tuple[float, float]] = []
        self.last = [-1] * WINDOW
        self.errors: list[str] = []

    def run(self) -> None:
        p = 0
        while not self.stop.is_set():
            for b in range(WINDOW):
                if self.stop.is_set():
                    break
                self.buf[:] = pattern(p, b)
                start = time.monotonic()
                try:
                    os.pwrite(self.fd, self.buf, b * BLOCK)
                except OSError as exc:
                    self.errors.append(f"pass {p} block {b} at {time.monotonic():.3f}: {exc}")
                    continue
                self.times.append((start, time.monotonic()))
                self.last[b] = p
            p += 1

    def verify(self) -> list[int]:
        """Blocks that do not hold their last write."""
        bad = []
        for b in range(WINDOW):
            os.preadv(self.fd, [self.buf], b * BLOCK)
            if self.last[b] >= 0 and self.buf[:] != pattern(self.last[b], b):
                bad.append(b)
        os.close(self.fd)
        return bad

    def max_ms_around(self, t0: float, t1: float) -> float:
        """The slowest write that was in flight at some point between T0 and T1."""
        around = [(e - s) * 1000 for s, e in self.times if e >= t0 and s <= t1]
        return round(max(around, default=0.0), 1)

    def max_ms_within(self, t0: float, t1: float) -> float:
        """The slowest write that started and ended between T0 and T1."""
        within = [(e - s) * 1000 for s, e in self.times if s >= t0 and e < t1]
        return round(max(within, default=0.0), 1)

    def median_ms(self) -> float | None:
        latencies = sorted((e - s) * 1000 for s, e in self.times)
        return round(latencies[len(latencies) // 2], 2) if latencies else None


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def wait_ready(out: Path, marker: str, timeout: float = 600) -> tuple[int, str]:
    """The pid and `ready` line of a shadowblk process started with its stdout to OUT; the pid
    is found by MARKER in its command line (the guest's /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = out.read_text().splitlines() if out.exists() else []
        if lines and lines[0].startswith("ready "):
            return _pid(marker), lines[0]
        time.sleep(0.2)
    raise RuntimeError(f"{out}: never ready")


def _pid(marker: str) -> int:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and b"shadowblk.cli" in cmdline:
                return int(proc.name)
    raise RuntimeError(f"no process with {marker}")
