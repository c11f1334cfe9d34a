"""kill -9 at random moments under a pipelined writer: no acknowledged write may ever be missing
from the dirty set the tracker recovers (over-reporting is allowed, under-reporting never)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from shadowblk.nbd.client import NBDClient
from shadowblk.tracking.tracker import recover_dirty
from tests.integration.test_serve_clients import start_serve
from tests.procs import Processes

SEED = 20261127
ITERATIONS = 20
SIZE = 256 << 20
BLOCK = 4096


def writer(
    url: str, rng: random.Random, acked: list[tuple[int, int]], stop: threading.Event
) -> None:
    """Pipelined writes (window of 8) inside one random 8 MiB window; records each one the
    server acknowledged, until the connection dies."""
    u = urlparse(url)
    window = rng.randrange(0, SIZE - (8 << 20), BLOCK)
    try:
        with NBDClient(u.hostname, u.port, u.path[1:]) as client:
            inflight: dict[int, tuple[int, int]] = {}
            while not stop.is_set():
                while len(inflight) < 8:
                    length = rng.choice([512, 4096, 12288, 65536, 1 << 20])
                    offset = window + rng.randrange(0, (8 << 20) - length, 512)
                    cookie = client.request(1, offset, length, 0, os.urandom(length))
                    inflight[cookie] = (offset, length)
                reply = client.reply()
                if reply.error == 0:
                    acked.append(inflight.pop(reply.cookie))
    except (OSError, ConnectionError):
        pass  # the server was killed under us


def covered(extents: list[tuple[int, int]], offset: int, length: int) -> bool:
    first, last = offset // BLOCK, (offset + length - 1) // BLOCK
    return any(o // BLOCK <= first and last < (o + n + BLOCK - 1) // BLOCK for o, n in extents)


def test_kill9_never_forgets_an_acknowledged_write(procs: Processes, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    all_acked: list[tuple[int, int]] = []
    for i in range(ITERATIONS):
        interval = rng.choice(["0.05", "0.3", "30"])  # kills land inside checkpoints too
        proc, url = start_serve(procs, tmp_path, "--save-interval", interval, size=str(SIZE))
        acked: list[tuple[int, int]] = []
        stop = threading.Event()
        thread = threading.Thread(
            target=writer, args=(url, random.Random(rng.random()), acked, stop)
        )
        thread.start()
        deadline = time.monotonic() + 60
        while not acked and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
        thread.join(10)
        assert acked, f"iteration {i}: no write was acknowledged before the kill"
        all_acked += acked
        recovered, notes = recover_dirty(tmp_path / "state")  # what `shadowblk dirty` reports
        assert not notes, notes
        extents = list(recovered.extents())
        missing = [w for w in all_acked if not covered(extents, *w)]
        assert not missing, f"seed {SEED} iteration {i}: acknowledged but forgotten: {missing[:5]}"
    dirty = sum(n for _, n in extents)
    assert dirty < SIZE, "the recovered set is the whole volume: the check proves nothing"


def test_sigterm_under_load_is_clean_and_exact(procs: Processes, tmp_path: Path) -> None:
    """SIGTERM while a client is writing: exit 0, and the saved state is exact: every
    acknowledged write is in it, and nothing outside the writes that were sent."""
    proc, url = start_serve(procs, tmp_path, size=str(SIZE))
    acked: list[tuple[int, int]] = []
    stop = threading.Event()
    rng = random.Random(SEED)
    thread = threading.Thread(target=writer, args=(url, rng, acked, stop))
    thread.start()
    deadline = time.monotonic() + 60
    while len(acked) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert procs.stop(proc, signal.SIGTERM) == 0
    stop.set()
    thread.join(10)
    assert len(acked) >= 50
    recovered, notes = recover_dirty(tmp_path / "state")
    assert not notes
    extents = list(recovered.extents())
    assert all(covered(extents, *w) for w in acked)
    start = random.Random(SEED).randrange(0, SIZE - (8 << 20), BLOCK)  # the writer's window
    assert all(start <= o and o + n <= start + (8 << 20) for o, n in extents)  # exact: no regions
