"""LiveScrub against a real tracker, backend and checksum observer: writes landing while it
scans (through the tracker's ordering lock, as the NBD loops issue them) never look like rot;
a byte flipped behind the server's back is found on the primary."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowblk.integrity.discrepancies import DiscrepancyLog
from shadowblk.integrity.live_scrub import LiveScrub, LiveVolume, ScrubStopped
from shadowblk.nbd.backend import Backend
from shadowblk.nbd.checksums import ChecksumObserver
from shadowblk.tracking.tracker import WriteTracker

SIZE = 8 << 20
BS = 4096


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[LiveVolume]:
    backend = Backend.open(tmp_path / "vol.img", SIZE, False)
    tracker = WriteTracker(tmp_path / "state", SIZE, BS)
    sums = ChecksumObserver(tmp_path / "state", backend, BS)
    tracker.observers.append(sums)
    yield LiveVolume("vol", tracker, backend, sums.map)
    sums.close()
    tracker.close()
    backend.close()


def write(vol: LiveVolume, offset: int, data: bytes) -> None:
    """As the Python NBD loop does: observers and the volume change under `ordering`."""
    with vol.tracker.ordering:
        vol.tracker.before_write(offset, data)
        vol.backend.pwrite(data, offset)


def scrubber(vol: LiveVolume, log: DiscrepancyLog, stop: threading.Event) -> LiveScrub:
    return LiveScrub(vol, log, "test", stop, lambda phase, n: None)


def test_writes_during_the_scan_are_no_discrepancy(volume: LiveVolume, tmp_path: Path) -> None:
    log = DiscrepancyLog(tmp_path / "d.jsonl")
    done = threading.Event()

    def writer() -> None:
        rng = random.Random(1)
        while not done.is_set():
            offset = rng.randrange(SIZE - 70_000)
            write(volume, offset, rng.randbytes(rng.randrange(1, 65_536)))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(50):
            report = scrubber(volume, log, threading.Event()).run(False, None, None)
            assert report.discrepancies == []
    finally:
        done.set()
        thread.join()
    assert list(log.read()) == []


def test_a_flipped_byte_is_found_on_the_primary(volume: LiveVolume, tmp_path: Path) -> None:
    write(volume, 0, random.Random(2).randbytes(1 << 20))
    fd = os.open(tmp_path / "vol.img", os.O_WRONLY)
    os.pwrite(fd, b"\x01", 5 * BS + 9)
    os.close(fd)
    log = DiscrepancyLog(tmp_path / "d.jsonl")
    report = scrubber(volume, log, threading.Event()).run(True, None, None)
    assert [(d.side, d.block, d.repaired) for d in report.discrepancies] == [("primary", 5, False)]
    assert report.exit_code == 2
    assert [r.block for r in log.read()] == [5]


def test_a_stopping_server_ends_the_scrub(volume: LiveVolume, tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(ScrubStopped):
        scrubber(volume, DiscrepancyLog(tmp_path / "d.jsonl"), stop).run(False, None, None)
