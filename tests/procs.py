"""Processes started by tests: started by PID, stopped by PID, always, even when a test fails."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from shadowblk.ports import free_port

SHADOWBLK = [sys.executable, "-m", "shadowblk.cli"]
__all__ = ["SHADOWBLK", "Processes", "free_port"]


class Processes:
    """Starts processes for one test and ends every one of them at teardown."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[subprocess.Popen] = []

    def start(
        self, argv: Sequence[str], name: str, env: dict[str, str] | None = None, **kw
    ) -> subprocess.Popen:
        """Start ARGV with stderr to LOGDIR/NAME.log; stdout stays a pipe for `ready` lines."""
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            **kw,
        )
        proc.log = log  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    @staticmethod
    def wait_ready(proc: subprocess.Popen, prefix: str = "ready ", timeout: float = 30) -> str:
        """Read stdout lines until one starts with PREFIX; return it. Fails on exit or timeout."""
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        buf = b""
        while time.monotonic() < deadline:
            chunk = proc.stdout.read()
            if chunk:
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith(prefix):
                        os.set_blocking(proc.stdout.fileno(), True)
                        return line.strip()
            elif proc.poll() is not None:
                raise AssertionError(f"process exited with {proc.returncode} before ready")
            time.sleep(0.02)
        raise AssertionError(f"no '{prefix}' line within {timeout}s; stdout so far: {buf!r}")

    @staticmethod
    def wait_export(proc: subprocess.Popen, uri: str, timeout: float = 10) -> None:
        """Wait until URI's export answers (nbdkit prints no ready line). Fails on exit or
        timeout."""
        deadline = time.monotonic() + timeout
        while subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode:
            assert proc.poll() is None, f"the server of {uri} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{uri} did not answer within {timeout}s"
            time.sleep(0.05)

    def start_nbdkit(self, argv: Sequence[str], export: str = "") -> tuple[subprocess.Popen, str]:
        """`nbdkit -f` on 127.0.0.1 with ARGV (filters, plugin, its settings) on a free port;
        its process and nbd:// URI once the export answers. nbdkit takes no port 0 and prints
        no ready line: a port picked free can be taken by another process before nbdkit binds
        it, and that one's answer would pass for nbdkit's; so the listening socket must be
        nbdkit's own, else another port is tried."""
        for _ in range(5):
            port = free_port()
            proc = self.start(
                ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), *argv], f"nbdkit-{port}"
            )
            uri = f"nbd://127.0.0.1:{port}/{export}"
            try:
                self.wait_export(proc, uri)
            except AssertionError:
                if proc.poll() is None:
                    raise
                continue  # it could not bind the port
            if _listens(proc.pid, port):
                return proc, uri
            self.stop(proc, signal.SIGKILL)
        raise AssertionError(f"nbdkit found no free port in 5 tries: {argv}")

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal PROC and wait for it; SIGKILL if it does not end in TIMEOUT. Returns its code."""
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.log.close()  # type: ignore[attr-defined]
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc, signal.SIGKILL if proc.poll() is None else signal.SIGTERM, timeout=5)


def _listens(pid: int, port: int) -> bool:
    """Whether process PID holds the socket listening on TCP PORT (from /proc)."""
    sockets = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # it exited meanwhile
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                listening = fields[3] == "0A"
                if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return fields[9] in sockets
    return False
