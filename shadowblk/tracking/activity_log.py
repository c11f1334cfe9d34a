"""The activity log: which coarse regions of a volume may have been written since the last saved
bitmap. A region is recorded here, durably, before the first write into it is issued, so a
crash can only ever over-report (the idea of DRBD's activity log and dm-era's eras).

On disk: files `hot-<generation>.log` in the state folder, each a sequence of 12-byte records
(u64 region index, u32 crc32c of those 8 bytes), little-endian. A new generation starts at every
checkpoint; the older ones are deleted once the bitmap covering them is saved.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import crc32c

RECORD = struct.Struct("<QI")
_NAME = re.compile(r"^hot-(\d{8})\.log$")


class ActivityLogCorruptError(ValueError):
    """A record inside a log (not at its torn tail) fails its checksum: trust nothing."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def generations(state_dir: Path) -> list[int]:
    """Generation numbers of the log files present, oldest first."""
    found = (_NAME.match(p.name) for p in state_dir.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def log_path(state_dir: Path, generation: int) -> Path:
    return state_dir / f"hot-{generation:08d}.log"


def read_regions(path: Path) -> set[int]:
    """Regions recorded in one log. A bad record followed only by bad records is a torn tail
    (never synced, so no write depended on it) and is ignored; a bad record followed by a good
    one is corruption."""
    data = path.read_bytes()
    regions: set[int] = set()
    bad_seen = False
    for pos in range(0, len(data) - len(data) % RECORD.size, RECORD.size):
        index, crc = RECORD.unpack_from(data, pos)
        if crc32c.crc32c(data[pos : pos + 8]) != crc:
            bad_seen = True
            continue
        if bad_seen:
            raise ActivityLogCorruptError(f"{path}: damaged record before offset {pos}")
        regions.add(index)
    return regions


class ActivityLog:
    """The current log generation, open for appending."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        existing = generations(state_dir)
        self.generation = (existing[-1] + 1) if existing else 1
        self._fd = self._create(self.generation)

    def _create(self, generation: int) -> int:
        fd = os.open(
            log_path(self.state_dir, generation),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
            0o644,
        )
        _fsync_dir(self.state_dir)
        return fd

    def record(self, regions: Iterable[int]) -> None:
        """Append REGIONS and make them durable before returning."""
        data = b"".join(
            RECORD.pack(r, crc32c.crc32c(struct.pack("<Q", r))) for r in sorted(regions)
        )
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fdatasync(self._fd)

    def rotate(self, carry: Iterable[int] = ()) -> list[int]:
        """Start a new generation holding CARRY (durably); return the generations it supersedes."""
        old = [g for g in generations(self.state_dir) if g <= self.generation]
        fd = self._create(self.generation + 1)
        os.close(self._fd)
        self._fd, self.generation = fd, self.generation + 1
        carry = list(carry)
        if carry:
            self.record(carry)
        return old

    def drop(self, superseded: list[int]) -> None:
        """Delete log generations a saved bitmap now covers."""
        for generation in superseded:
            log_path(self.state_dir, generation).unlink(missing_ok=True)
        _fsync_dir(self.state_dir)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
