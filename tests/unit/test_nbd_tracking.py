"""The durable tracking state of a served volume: activity log, checkpoints, recovery."""

from __future__ import annotations

import json
import struct
import subprocess
import threading
import time
from pathlib import Path

import crc32c
import pytest

from shadowblk.nbd.backend import Backend
from shadowblk.nbd.client import NBDClient
from shadowblk.nbd.handshake import Export
from shadowblk.nbd.server import NBDServer
from shadowblk.tracking.activity_log import RECORD, log_path, read_regions
from shadowblk.tracking.tracker import (
    AHEAD,
    CARRIED,
    PENDING,
    WRITTEN,
    StateError,
    WriteTracker,
    recover_dirty,
)
from tests.procs import SHADOWBLK

MiB = 1 << 20
SIZE = 64 * MiB


def crash(tracker: WriteTracker) -> None:
    """Drop the tracker the way kill -9 would: no final checkpoint."""
    tracker._stop.set()
    tracker._saver.join()
    tracker._log.close()


def test_clean_stop_is_exact_and_crash_over_reports(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = WriteTracker(state, SIZE, region_size=4 * MiB)
    t.before_writes([4096, 10 * MiB], [4096, 100])
    t.close()
    bitmap, notes = recover_dirty(state)
    assert list(bitmap.extents()) == [(4096, 4096), (10 * MiB, 4096)] and not notes

    t = WriteTracker(state, SIZE, region_size=4 * MiB)  # restart keeps what was saved
    t.before_writes([33 * MiB], [8192])
    crash(t)
    bitmap, notes = recover_dirty(state)
    # the unsaved write is covered by its whole 4 MiB region; the saved ones stay exact
    assert list(bitmap.extents()) == [(4096, 4096), (10 * MiB, 4096), (32 * MiB, 4 * MiB)]


def test_checkpoint_carries_only_recently_written_regions(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = WriteTracker(state, SIZE, region_size=4 * MiB)
    t.before_writes([0, 8 * MiB], [512, 512])
    t.checkpoint()  # both regions were written in this interval: carried
    t.before_writes([8 * MiB + 4096], [512])
    t.checkpoint()  # only region 2 was written since: region 0 retires
    crash(t)
    logged = set()
    for p in state.glob("hot-*.log"):
        logged |= read_regions(p)
    assert logged == {2}
    bitmap, _ = recover_dirty(state)
    assert list(bitmap.extents()) == [(0, 4096), (8 * MiB, 4 * MiB)]


def logged_regions(state: Path) -> set[int]:
    regions: set[int] = set()
    for p in state.glob("hot-*.log"):
        regions |= read_regions(p)
    return regions


def test_sequential_writer_logs_regions_ahead(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = WriteTracker(state, SIZE, region_size=4 * MiB)  # 16 regions
    t.before_writes([20 * MiB], [4096])  # a lone write: its region only
    assert logged_regions(state) == {5}
    t.before_writes([MiB], [4 * MiB])  # regions 0 and 1; region 1 follows 0 in the same batch
    assert logged_regions(state) == set(range(9))  # 1 and the 7 after it
    assert t.hot[1] == WRITTEN and t.hot[2] == AHEAD and t.hot[3] == CARRIED
    assert t.hot[5] == WRITTEN
    t.before_writes([33 * MiB], [4096])  # region 8: logged ahead already, no new record
    assert t.hot[8] == WRITTEN and logged_regions(state) == set(range(9))
    t.before_writes([36 * MiB], [4096])  # region 9, right after 8: 9 and the rest (to 15)
    assert logged_regions(state) == set(range(16))
    crash(t)
    bitmap, _ = recover_dirty(state)  # a crash over-reports the regions logged ahead
    assert list(bitmap.extents()) == [(0, SIZE)]

    state = tmp_path / "state2"
    t = WriteTracker(state, SIZE, region_size=4 * MiB)
    t.before_writes([9 * MiB, 13 * MiB], [4096, 4096])  # region 3 right after region 2
    assert logged_regions(state) == set(range(2, 11))
    t.checkpoint()  # 2 and 3 were written this interval and are carried; 4..10 retire
    assert logged_regions(state) == {2, 3}
    crash(t)
    bitmap, _ = recover_dirty(state)
    assert list(bitmap.extents()) == [(8 * MiB, 8 * MiB)]


def test_entering_the_window_logged_ahead_logs_the_next_one_in_the_background(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    t = WriteTracker(state, SIZE, region_size=4 * MiB)  # 16 regions
    t.before_writes([0], [4096])
    t.before_writes([4 * MiB], [4096])  # right after region 0: 1 and the 7 after it
    assert logged_regions(state) == set(range(9)) and t.hot[2] == AHEAD
    t.before_writes([8 * MiB], [4096])  # enters the window logged ahead: no record of its own
    assert t.hot[2] == WRITTEN

    def settled() -> bool:  # the records on disk, then the regions' states set after them
        return logged_regions(state) == set(range(16)) and PENDING not in list(t.hot[:16])

    deadline = time.monotonic() + 30
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert logged_regions(state) == set(range(16))  # the prelogger logged 9..15
    assert t.hot[9] == AHEAD and t.hot[10] == CARRIED
    t.checkpoint()  # only 0, 1, 2 were written: the rest retire
    assert logged_regions(state) == {0, 1, 2} and t.hot[9] == 0
    crash(t)
    bitmap, _ = recover_dirty(state)  # the carried regions, whole; nothing logged ahead
    assert list(bitmap.extents()) == [(0, 12 * MiB)]


def test_torn_tail_is_ignored_but_damage_inside_makes_all_dirty(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = WriteTracker(state, SIZE, region_size=4 * MiB)
    t.before_writes([0], [512])
    t.before_writes([8 * MiB], [512])  # not adjacent: nothing is logged ahead
    crash(t)
    log = max(state.glob("hot-*.log"))
    data = log.read_bytes()
    log.write_bytes(data + b"\x07" * 5)  # a torn, never-synced append
    bitmap, notes = recover_dirty(state)
    assert list(bitmap.extents()) == [(0, 4 * MiB), (8 * MiB, 4 * MiB)] and not notes
    log.write_bytes(b"\xff" * RECORD.size + data)  # damage before good records
    bitmap, notes = recover_dirty(state)
    assert list(bitmap.extents()) == [(0, SIZE)] and "damaged" in notes[0]


def test_damaged_bitmap_and_foreign_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    WriteTracker(state, SIZE).close()
    bitmap_file = state / "dirty.bitmap"
    raw = bytearray(bitmap_file.read_bytes())
    raw[-1] ^= 0xFF
    bitmap_file.write_bytes(bytes(raw))
    bitmap, notes = recover_dirty(state)
    assert bitmap.count() == SIZE // 4096 and notes
    with pytest.raises(StateError, match="geometry"):
        WriteTracker(state, 2 * SIZE)
    with pytest.raises(StateError, match="not a shadowblk"):
        recover_dirty(tmp_path)


def test_region_beyond_volume_is_damage(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = WriteTracker(state, SIZE, region_size=4 * MiB)
    crash(t)
    index = struct.pack("<Q", 1000)
    log_path(state, 99).write_bytes(index + struct.pack("<I", crc32c.crc32c(index)))
    bitmap, notes = recover_dirty(state)
    assert bitmap.count() == SIZE // 4096 and "beyond" in notes[0]


def test_dirty_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = WriteTracker(state, SIZE)
    t.before_writes([MiB], [3 * 4096])
    t.close()
    out = subprocess.run(
        [*SHADOWBLK, "dirty", "--state-dir", str(state), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    assert report["extents"] == [[MiB, 3 * 4096]] and report["dirty_bytes"] == 3 * 4096
    text = subprocess.run(
        [*SHADOWBLK, "dirty", "--state-dir", str(state)], capture_output=True, text=True, check=True
    ).stdout
    assert text.splitlines()[0] == f"{MiB} {3 * 4096}"
    bad = subprocess.run(
        [*SHADOWBLK, "dirty", "--state-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "not a shadowblk tracking state folder" in bad.stderr


class HeldLog:
    """Stands in for the tracker's activity log: record() waits for `go`, so a test can see
    which writes wait for a region's record and which go on meanwhile."""

    def __init__(self, tracker: WriteTracker) -> None:
        self.inner = tracker._log
        tracker._log = self  # type: ignore[assignment]
        self.entered = threading.Event()
        self.go = threading.Event()
        self.recorded: list[list[int]] = []

    def record(self, regions: list[int]) -> None:
        self.entered.set()
        assert self.go.wait(30)
        self.inner.record(regions)
        self.recorded.append(list(regions))

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_writes_wait_for_their_region_s_record_only(tmp_path: Path, native: bool) -> None:
    image = tmp_path / "vol.img"
    image.write_bytes(bytes(SIZE))
    backend = Backend.open(image, None, False)
    tracker = WriteTracker(tmp_path / "state", SIZE, region_size=4 * MiB, save_interval=3600)
    server = NBDServer(Export("vol", backend), "127.0.0.1", 0, tracker=tracker, native=native)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()

    def write(offset: int) -> threading.Thread:
        def run() -> None:
            with NBDClient("127.0.0.1", server.port, "vol") as client:
                client.pwrite(b"\x5a" * 4096, offset)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    try:
        write(0).join(30)  # region 0 logged the ordinary way
        held = HeldLog(tracker)
        first = write(40 * MiB)  # region 10: its record is held
        assert held.entered.wait(30)
        logged = write(4096)  # region 0 is logged: not held up by region 10's record
        logged.join(30)
        assert not logged.is_alive()
        second = write(40 * MiB + 8192)  # region 10 again: must wait for that record
        second.join(0.5)
        assert second.is_alive() and first.is_alive() and tracker.hot[10] == PENDING
        held.go.set()
        first.join(30)
        second.join(30)
        assert not first.is_alive() and not second.is_alive()
        assert held.recorded == [[10]]  # one record; the second write found it done
        assert tracker.hot[10] == WRITTEN
    finally:
        server.stop()
        serving.join(30)
    assert (40 * MiB, 4096) in list(recover_dirty(tmp_path / "state")[0].extents())
