"""Child processes of the agent (and of the lab): started so they cannot outlive their parent,
restarted with backoff when they die, stopped by PID.

Each child gets PR_SET_PDEATHSIG=SIGTERM: if the agent is killed with SIGKILL, the kernel
still ends its `serve` and `shadow` children cleanly, so nothing is orphaned.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

log = logging.getLogger(__name__)

SHADOWBLK = [sys.executable, "-m", "shadowblk.cli"]
PR_SET_PDEATHSIG = 1
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0
STABLE_S = 30.0  # a child that ran this long starts its next backoff from the minimum


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when PARENT ends (or exits if it already has)."""

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def spawn(argv: Sequence[str], stderr: IO[Any] | int | None = None, **kw: Any) -> subprocess.Popen:
    """Start ARGV with stdout a pipe (for its `ready` line), tied to this process's life."""
    return subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with(os.getpid()),  # children start from one thread
        **kw,
    )


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM PROC and wait; SIGKILL if it does not end in TIMEOUT. Its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()
    return proc.returncode


class ReadyLine:
    """Collects a child's stdout without blocking until it printed `ready URL`."""

    def __init__(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        self.proc, self.buf, self.url = proc, b"", None

    def poll(self) -> str | None:
        """The URL of the ready line, once it came."""
        if self.url is None and self.proc.stdout and not self.proc.stdout.closed:
            chunk = self.proc.stdout.read()
            self.buf += chunk or b""
            for line in self.buf.decode(errors="replace").splitlines():
                if line.startswith("ready "):
                    self.url = line.removeprefix("ready ").strip()
        return self.url

    def line(self, prefix: str) -> str | None:
        """What followed PREFIX on a line printed so far (before the ready line, say)."""
        for line in self.buf.decode(errors="replace").splitlines():
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip()
        return None


def wait_ready(proc: subprocess.Popen, what: str, timeout: float) -> str:
    """Block until PROC (WHAT, for errors) prints `ready URL`; RuntimeError if it exits or is
    too slow."""
    ready, deadline = ReadyLine(proc), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (url := ready.poll()) is not None:
            return url
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before ready")
        time.sleep(0.02)
    raise RuntimeError(f"{what} printed no ready line within {timeout:.0f} s")


class Child:
    """One supervised child: (re)started from ARGV() with exponential backoff after a death.

    ARGV is called at every start, so a restart sees the current configuration (a remembered
    port, the shadows' current addresses); it may raise LookupError to put the start off.
    """

    def __init__(self, name: str, argv: Callable[[], list[str]]) -> None:
        self.name, self.argv = name, argv
        self.proc: subprocess.Popen | None = None
        self.ready: ReadyLine | None = None
        self.url: str | None = None
        self.restarts = 0
        self.last_error = ""
        self._backoff, self._next_start, self._started = BACKOFF_MIN_S, 0.0, 0.0
        self._asked_to_end = False  # terminate(): its exit is no failure

    @property
    def state(self) -> str:
        if self.proc is None:
            return "backoff" if self.restarts or self.last_error else "starting"
        return "running" if self.url else "starting"

    def tick(self, now: float) -> None:
        """Start it if it is due, note its ready line, and schedule a restart if it died."""
        if self.proc is None:
            if now >= self._next_start:
                self._start(now)
            return
        if self.ready is not None and (url := self.ready.poll()) is not None:
            self.url = url
        code = self.proc.poll()
        if code is None:
            return
        stop(self.proc)
        self.proc, self.ready, self.url = None, None, None
        if self._asked_to_end:
            self._asked_to_end, self._next_start = False, now
            return
        if now - self._started > STABLE_S:
            self._backoff = BACKOFF_MIN_S
        self.restarts += 1
        self.last_error = f"exited with {code}"
        self._next_start = now + self._backoff
        log.warning("%s %s; restarting in %.1f s", self.name, self.last_error, self._backoff)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _start(self, now: float) -> None:
        try:
            argv = self.argv()
        except LookupError as err:
            self.last_error = str(err)
            self._next_start = now + BACKOFF_MIN_S
            return
        log.info("starting %s: %s", self.name, " ".join(argv))
        self.proc, self._started = spawn(argv), now
        self.ready = ReadyLine(self.proc)

    def hand_off(self) -> subprocess.Popen | None:
        """Detach the running process for another Child to adopt; the next tick starts a new
        one (a zygote handed over, not a failure)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None
        self.proc, self.ready, self.url, self._next_start = None, None, None, 0.0
        return proc

    def adopt(self, proc: subprocess.Popen) -> None:
        """Supervise PROC, started elsewhere (a zygote), as if this Child had started it."""
        self.proc, self._started = proc, time.monotonic()
        self.ready = ReadyLine(proc)

    def terminate(self) -> subprocess.Popen | None:
        """SIGTERM it without waiting; the next tick after it exited starts it again (no
        backoff, not counted as a restart). The process, to wait for if need be."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self._asked_to_end = True
            proc.terminate()
        return proc

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc, self.ready, self.url = None, None, None
