"""A write captured before a shadow's sync was planned, but not yet on the volume when the
sync reads it: the sync must not ship the block's old data (I1).

The NBD server holds `tracker.ordering` from a write's capture (the observers' call) through
the volume's write; a cut in between closes the write's epoch, and a shadow (re)connecting then
gets a plan that starts after that epoch, so the write reaches it only through the sync's read
of the volume. The replicator waits for the writers (`Replicator.write_barrier`, the server's
`WriteTracker.wait_writes`) before the sync reads anything. Here the test holds the lock the
way a slow NBD worker would, well past the moment the sync would have read the block.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

from shadowblk.delta.replicator import Replicator
from shadowblk.tracking.tracker import WriteTracker
from tests.delta_driver import BLOCK, make_key, start_shadow
from tests.procs import Processes

SIZE = 16 << 20


def test_a_sync_reads_a_captured_write_once_it_is_on_the_volume(
    tmp_path: Path, procs: Processes
) -> None:
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
    )  # fmt: skip
    rep.write_barrier = tracker.wait_writes  # as `shadowblk serve` sets it
    offset, data = 2924 * BLOCK + 411, random.Random(1).randbytes(3000)  # unaligned: 2 blocks
    try:
        with tracker.ordering:  # a slow NBD worker: from the capture to the volume's write
            rep.on_write(offset, data)
            rep.cut_epoch()  # a cut meanwhile: the write's epoch is older than any plan now
            rep.start()  # a new shadow: a full sync, planned while the write is not on the volume
            deadline = time.monotonic() + 60
            while rep.status()["shadows"][0]["phase"] not in ("full-sync", "streaming"):
                assert time.monotonic() < deadline, rep.status()
                time.sleep(0.02)
            time.sleep(0.5)  # without the barrier, the sync has read the block by now
            os.pwrite(fd, data, offset)
        assert rep.drain(60), rep.status()
    finally:
        rep.close()
        tracker.close()
        os.close(fd)
    same = subprocess.run(["cmp", str(volume), str(tmp_path / "s" / "vol1.img")], check=False)
    assert same.returncode == 0, "the shadow kept the block's data from before the write"
