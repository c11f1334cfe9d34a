"""SIGTERM stops `serve` cleanly even while a client has stopped reading its replies: the
replies it will not take are given up after a bounded wait, that client alone is dropped, and
the server flushes, saves its tracking state and exits 0 (issue 3: SIGTERM finishes in-flight
requests; a client that never reads cannot hold the stop for ever)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from urllib.parse import urlparse

from shadowblk.nbd import protocol as P
from shadowblk.nbd.client import NBDClient
from tests.integration.test_serve_clients import start_serve
from tests.procs import Processes

READS = 64  # of 1 MiB each: far more than both sockets' buffers hold


def test_sigterm_with_a_client_that_stopped_reading(procs: Processes, tmp_path: Path) -> None:
    proc, url = start_serve(procs, tmp_path, size="64M")
    u = urlparse(url)
    with NBDClient(u.hostname, u.port, u.path[1:]) as stuck:
        for i in range(READS):
            stuck.request(P.CMD_READ, (i % 64) << 20, 1 << 20)
        time.sleep(1)  # the server fills the socket's buffers, then waits to send the rest
        with NBDClient(u.hostname, u.port, u.path[1:]) as other:  # the others still served
            other.pwrite(b"\x5a" * 4096, 0)
            assert other.pread(0, 4096) == b"\x5a" * 4096
        # 60 s: far beyond the server's bounded wait, only a hang gets there
        assert procs.stop(proc, signal.SIGTERM, timeout=60) == 0
    log = (procs.logdir / "serve.log").read_text()
    assert "Traceback" not in log and "client 127.0.0.1" in log
