"""SIGTERM and clients that read slowly or not at all (issue 3: SIGTERM finishes in-flight
requests; a hostile client is disconnected alone, the others keep being served).

- A client that stopped reading cannot hold the stop for ever: replies it will not take are
  given up after a bounded wait, that client alone is dropped, and the server flushes, saves
  its tracking state and exits 0.
- A client that reads, however slowly, gets its in-flight reply whole across a stop.
- With replication on (observers), a client that stopped reading in the middle of a batch of
  writes and reads does not hold the other clients' writes: no reply is sent while the batch
  holds the volume's write-ordering lock.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from shadowblk.nbd import protocol as P
from shadowblk.nbd.client import NBDClient
from tests.delta_driver import make_key, start_shadow
from tests.integration.test_serve_clients import start_serve
from tests.procs import Processes

READS = 64  # of 1 MiB each: far more than both sockets' buffers hold
MiB = 1 << 20


def connect(url: str) -> NBDClient:
    u = urlparse(url)
    return NBDClient(u.hostname or "", u.port or 0, u.path[1:])


def test_sigterm_with_a_client_that_stopped_reading(procs: Processes, tmp_path: Path) -> None:
    proc, url = start_serve(procs, tmp_path, size="64M")
    with connect(url) as stuck:
        for i in range(READS):
            stuck.request(P.CMD_READ, (i % 64) * MiB, MiB)
        time.sleep(1)  # the server fills the socket's buffers, then waits to send the rest
        with connect(url) as other:  # the others still served
            other.pwrite(b"\x5a" * 4096, 0)
            assert other.pread(0, 4096) == b"\x5a" * 4096
        # 60 s: far beyond the server's bounded wait, only a hang gets there
        assert procs.stop(proc, signal.SIGTERM, timeout=60) == 0
    log = (procs.logdir / "serve.log").read_text()
    assert "Traceback" not in log and "client 127.0.0.1" in log


def test_a_slow_reader_gets_its_whole_reply_across_a_stop(procs: Processes, tmp_path: Path) -> None:
    proc, url = start_serve(procs, tmp_path, size="64M")
    size = 16 * MiB
    with connect(url) as slow:
        slow.request(P.CMD_READ, 0, size)
        time.sleep(0.5)  # the reply fills the socket's buffers
        threading.Timer(0.3, proc.send_signal, (signal.SIGTERM,)).start()
        got = len(slow.recv(16))  # the simple reply's header
        while got < 16 + size:
            got += len(slow.recv(min(256 << 10, 16 + size - got)))
            time.sleep(0.02)  # about 12 MiB/s: slow, but it reads
    assert procs.stop(proc, signal.SIGTERM, timeout=60) == 0


def test_a_client_that_stopped_reading_does_not_hold_other_writers(
    procs: Processes, tmp_path: Path
) -> None:
    key = make_key(tmp_path / "key")
    _, port = start_shadow(procs, tmp_path / "s", key, "shadow")
    extra = ["--shadow", f"127.0.0.1:{port}", "--hmac-key-file", str(key)]
    proc, url = start_serve(procs, tmp_path, *extra, size="64M")
    stuck = connect(url)
    flooding = threading.Thread(target=flood, args=(stuck,), daemon=True)
    flooding.start()
    time.sleep(3)  # the stuck client's batches have filled every buffer
    done: list[float] = []

    def other_write() -> None:
        with connect(url) as other:
            other.pwrite(b"\x5a" * 4096, 8 * MiB)
            done.append(time.monotonic())

    writer = threading.Thread(target=other_write, daemon=True)
    writer.start()
    writer.join(60)  # a hang bound: before the fix it waited for the stuck client for ever
    assert done, "another client's write waited for a client that does not read its replies"
    assert procs.stop(proc, signal.SIGTERM, timeout=60) == 0
    stuck.close()


def flood(client: NBDClient) -> None:
    """[WRITE 4 KiB, READ 1 MiB] pairs, never reading a reply (until the server drops it)."""
    try:
        for i in range(READS):
            client.request(P.CMD_WRITE, i * 4096, 4096, payload=b"\1" * 4096)
            client.request(P.CMD_READ, (i % 64) * MiB, MiB)
    except OSError:
        pass  # the server gave this client up


def test_a_refusal_to_a_client_that_stopped_reading_does_not_hold_other_writers(
    procs: Processes, tmp_path: Path
) -> None:
    """A TRIM goes to the Python loop; the fence refuses it (the lease ran out) and its error
    reply cannot go out to a client that does not read: it must not be sent under the
    volume's write-ordering lock, or every other writer (and the fence) waits for that client."""
    lease = ["--control-socket", str(tmp_path / "ctl.sock"), "--lease", "1"]
    proc, url = start_serve(procs, tmp_path, *lease, size="64M")
    with connect(url) as probe:  # until the lease has run out: writes refused (ESHUTDOWN)
        deadline = time.monotonic() + 60
        while probe.request(P.CMD_WRITE, 0, 4096, payload=bytes(4096)) and (
            probe.reply().error != P.ESHUTDOWN
        ):
            assert time.monotonic() < deadline, "the lease never ran out"
            time.sleep(0.1)
    with connect(url) as stuck:
        stuck.request(P.CMD_READ, 0, 32 * MiB)  # never read: its reply fills the socket
        time.sleep(0.5)
        stuck.request(P.CMD_TRIM, 0, 4096)  # refused by the fence, in the Python loop
        time.sleep(0.5)
        u = urlparse(url)
        # 30 s: a hang bound; before the fix the write waited for the stuck client for ever
        with NBDClient(u.hostname or "", u.port or 0, u.path[1:], timeout=30) as other:
            other.request(P.CMD_WRITE, MiB, 4096, payload=b"x" * 4096)
            assert other.reply().error == P.ESHUTDOWN
    assert procs.stop(proc, signal.SIGTERM, timeout=60) == 0
