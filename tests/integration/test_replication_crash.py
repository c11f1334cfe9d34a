"""kill -9 of a replicated primary (sync mode) under a pipelined writer, at seeded random
moments: no write acknowledged before an acknowledged FLUSH may be missing from either shadow
at the moment of the kill (I2), and after a restart with the same state folder and shadows
both shadows converge to a byte-identical copy of the primary (resync, I1)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from shadowblk.nbd import protocol as P
from shadowblk.nbd.client import NBDClient
from tests.delta_driver import make_key
from tests.integration.test_replication_serve import (
    VOLUME,
    cmp,
    converged,
    shadows,
    start_primary,
)
from tests.procs import Processes

SEED = 20261128
ITERATIONS = 20
BLOCK = 4096
WINDOW = 2 << 20  # writes overlap inside it, so later writes replace flushed ones


class History:
    """What was sent to each block, in order, and which of those a FLUSH acknowledged."""

    def __init__(self) -> None:
        self.sent: dict[int, list[bytes]] = {}
        self.flushed: dict[int, int] = {}  # block -> index of its last flushed value
        self.flushes = 0
        self.lock = threading.Lock()

    def send(self, offset: int, data: bytes) -> None:
        with self.lock:
            for i in range(len(data) // BLOCK):
                self.sent.setdefault(offset // BLOCK + i, []).append(
                    data[i * BLOCK : (i + 1) * BLOCK]
                )

    def flush_acknowledged(self, blocks: set[int]) -> None:
        """Every write to BLOCKS was acknowledged before the FLUSH that just was."""
        with self.lock:
            for block in blocks:
                self.flushed[block] = len(self.sent[block]) - 1
            self.flushes += 1

    def allowed(self, block: int) -> list[bytes]:
        """The values a shadow may hold: the last flushed one or anything sent after it."""
        return self.sent[block][self.flushed[block] :]


def writer(url: str, rng: random.Random, history: History, stop: threading.Event) -> None:
    """Batches of pipelined writes, each followed by a FLUSH once all were acknowledged."""
    u = urlparse(url)
    try:
        with NBDClient(u.hostname, u.port, u.path[1:]) as client:
            while not stop.is_set():
                blocks: set[int] = set()
                inflight = 0
                for _ in range(rng.randint(1, 16)):
                    n = rng.randint(1, 8)
                    offset = rng.randrange(0, WINDOW - n * BLOCK, BLOCK)
                    data = rng.randbytes(n * BLOCK)
                    history.send(offset, data)
                    client.request(P.CMD_WRITE, offset, len(data), 0, data)
                    blocks.update(range(offset // BLOCK, offset // BLOCK + n))
                    inflight += 1
                for _ in range(inflight):
                    assert client.reply().error == 0
                client.request(P.CMD_FLUSH)
                assert client.reply().error == 0
                history.flush_acknowledged(blocks)
    except (OSError, ConnectionError):
        pass  # the server was killed under us


def check_shadow(image: Path, history: History) -> int:
    """Every flushed block holds an allowed value; returns how many blocks were checked."""
    with open(image, "rb") as f:
        for block in history.flushed:
            got = os.pread(f.fileno(), BLOCK, block * BLOCK)
            assert got in history.allowed(block), f"{image}: block {block} lost a flushed write"
    return len(history.flushed)


def test_kill9_of_a_sync_primary_loses_nothing_flushed(procs: Processes, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    key = make_key(tmp_path / "key")
    ports = shadows(procs, tmp_path, key)
    primary = tmp_path / f"{VOLUME}.img"
    checked = 0
    for i in range(ITERATIONS):
        proc, url = start_primary(procs, tmp_path, ports, key, "sync", size="16M")
        converged(tmp_path / "state")  # the previous kill is resynced: equal again
        for k in range(2):
            cmp(primary, tmp_path / f"s{k}" / f"{VOLUME}.img")
        history, stop = History(), threading.Event()
        thread = threading.Thread(
            target=writer, args=(url, random.Random(rng.random()), history, stop)
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not history.flushes and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
        thread.join(10)
        assert history.flushes, f"iteration {i}: no FLUSH was acknowledged before the kill"
        for k in range(2):
            checked += check_shadow(tmp_path / f"s{k}" / f"{VOLUME}.img", history)
    proc, _ = start_primary(procs, tmp_path, ports, key, "sync", size="16M")
    converged(tmp_path / "state")
    assert procs.stop(proc) == 0
    for k in range(2):
        cmp(primary, tmp_path / f"s{k}" / f"{VOLUME}.img")
    assert checked > 1000, "too few flushed blocks were checked to prove anything"
