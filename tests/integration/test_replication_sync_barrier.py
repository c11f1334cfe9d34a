"""A write captured before a shadow's sync was planned, but not yet on the volume when the
sync reads it: the sync must not ship the block's old data (I1).

The NBD server holds `tracker.ordering` from a write's capture (the observers' call) through
the volume's write; a cut in between closes the write's epoch, and a shadow (re)connecting then
gets a plan that starts after that epoch, so the write reaches it only through the sync's read
of the volume. The replicator makes its plans under the writers' lock (`Replicator.writers`,
the server's `tracker.ordering`), so no write is half-way when a sync is planned. Here the test
holds the lock the way a slow NBD worker would, well past the moment an unguarded sync would
have read the block.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shadowblk.delta.replicator import Replicator
from shadowblk.tracking.tracker import WriteTracker
from tests.delta_driver import BLOCK, make_key, start_shadow
from tests.procs import Processes

SIZE = 16 << 20


@dataclass
class Primary:
    """A volume file, the server's write tracker and a replicator to one new shadow, wired as
    `shadowblk serve` wires them (plans under the tracker's ordering lock)."""

    volume: Path
    image: Path  # the shadow's copy
    fd: int
    tracker: WriteTracker
    rep: Replicator

    def close(self) -> None:
        self.rep.close()
        self.tracker.close()
        os.close(self.fd)

    def same(self) -> bool:
        compared = subprocess.run(["cmp", str(self.volume), str(self.image)], check=False)
        return compared.returncode == 0


@pytest.fixture
def primary(tmp_path: Path, procs: Processes, request: pytest.FixtureRequest) -> Iterator[Primary]:
    key = make_key(tmp_path / "key")
    _, port = start_shadow(procs, tmp_path / "s", key, "shadow")
    volume = tmp_path / "primary.img"
    with open(volume, "wb") as f:
        f.truncate(SIZE)
    fd = os.open(volume, os.O_RDWR)
    tracker = WriteTracker(tmp_path / "tracking", SIZE, BLOCK)
    rep = Replicator(
        "vol1", fd, SIZE, [f"127.0.0.1:{port}"], tmp_path / "state",
        hmac_key=key.read_text().encode(), cut_interval=None,
        max_lag_bytes=getattr(request, "param", 64 << 20),
    )  # fmt: skip
    rep.writers = tracker.ordering  # as `shadowblk serve` sets it
    p = Primary(volume, tmp_path / "s" / "vol1.img", fd, tracker, rep)
    try:
        yield p
    finally:
        p.close()


def test_a_sync_reads_a_captured_write_once_it_is_on_the_volume(primary: Primary) -> None:
    rep = primary.rep
    offset, data = 2924 * BLOCK + 411, random.Random(1).randbytes(3000)  # unaligned: 2 blocks
    with primary.tracker.ordering:  # a slow NBD worker: from the capture to the volume's write
        rep.on_write(offset, data)
        rep.cut_epoch()  # a cut meanwhile: the write's epoch is older than any plan now
        rep.start()  # a new shadow connects: a full sync, to be planned
        time.sleep(1.5)  # unguarded, the plan is made and the block read by now
        os.pwrite(primary.fd, data, offset)
    assert rep.drain(60), rep.status()
    assert primary.same(), "the shadow kept the block's data from before the write"


@pytest.mark.parametrize("primary", [1 << 20], indirect=True)  # a 1 MiB lag budget
def test_a_writer_held_up_by_back_pressure_does_not_wait_for_a_shadow_being_planned(
    primary: Primary,
) -> None:
    """The plan waits for the writers' lock; a writer that holds it and is over the lag budget
    must not wait for that shadow in turn (it is not connected until planned), else neither
    moves."""
    rep, rng = primary.rep, random.Random(2)
    with primary.tracker.ordering:  # one long batch of a worker: 2 MiB, twice the lag budget
        rep.start()
        time.sleep(1)  # the shadow connected and waits to be planned
        for i in range(8):
            chunk = rng.randbytes(256 << 10)
            rep.on_write(i * len(chunk), chunk)
            os.pwrite(primary.fd, chunk, i * len(chunk))
    assert rep.drain(60), rep.status()
    assert primary.same()
