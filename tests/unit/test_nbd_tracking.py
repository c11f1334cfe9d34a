"""The durable tracking state of a served volume: activity log, checkpoints, recovery."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import crc32c
import pytest

from shadowblk.tracking.activity_log import RECORD, log_path, read_regions
from shadowblk.tracking.tracker import StateError, WriteTracker, recover_dirty
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


def test_torn_tail_is_ignored_but_damage_inside_makes_all_dirty(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = WriteTracker(state, SIZE, region_size=4 * MiB)
    t.before_writes([0], [512])
    t.before_writes([4 * MiB], [512])
    crash(t)
    log = max(state.glob("hot-*.log"))
    data = log.read_bytes()
    log.write_bytes(data + b"\x07" * 5)  # a torn, never-synced append
    bitmap, notes = recover_dirty(state)
    assert list(bitmap.extents()) == [(0, 8 * MiB)] and not notes
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
