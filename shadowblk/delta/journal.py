"""The staging journal of a shadow volume: epochs are made durable here before they touch the
image, so a crash at any instruction leaves the image recoverable to an epoch boundary.

File: a sequence of records, little-endian: magic "SBJR", kind u8, 3 zero bytes, offset u64,
length u64, epoch u64, data length u32, crc32c u32 of the preceding 36 bytes and the data; then
the data. A COMMIT record (the epoch) seals every record before it; it is written and
fdatasynced once every frame of the epoch is staged: that one fdatasync is the epoch's
durability point. Several committed epochs follow each other until a checkpoint (image synced,
state recorded) empties the journal; records after the last COMMIT are an incomplete epoch,
never applied.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import crc32c

MAGIC = b"SBJR"
_RECORD = struct.Struct("<4sB3xQQQI")
_CRC = struct.Struct("<I")
HEAD_SIZE = _RECORD.size + _CRC.size


class Kind(IntEnum):
    DATA = 1
    ZERO = 2
    TRIM = 3
    COMMIT = 4


@dataclass(frozen=True)
class Record:
    kind: Kind
    offset: int
    length: int
    epoch: int
    data: bytes | memoryview


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Appends records at `end`; commit() makes everything up to there durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self.end = 0  # where the next record goes
        self.committed_end = 0  # just after the last COMMIT record written by this object

    def begin(self) -> None:
        """Stage after the committed records: anything staged but not committed is void."""
        if self._fd < 0:
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if created:  # commit() syncs the file, not its name: an acknowledged epoch in a
                fsync_dir(self.path.parent)  # journal whose entry was lost would be lost too
        os.ftruncate(self._fd, self.committed_end)
        self.end = self.committed_end

    def append(
        self, kind: Kind, offset: int, length: int, epoch: int, data: bytes | memoryview = b""
    ) -> None:
        head = _RECORD.pack(MAGIC, int(kind), offset, length, epoch, len(data))
        crc = crc32c.crc32c(data, value=crc32c.crc32c(head))
        self.end += _write_all(self._fd, [head + _CRC.pack(crc), data], self.end)

    def commit(self, epoch: int) -> None:
        """Seal the staged records durably: after this returns, recovery will apply them."""
        self.append(Kind.COMMIT, 0, 0, epoch)
        os.fdatasync(self._fd)  # the records and the file's length: all recovery reads
        self.committed_end = self.end

    def reset(self) -> None:
        """Empty the journal once what it committed is on the image and in the state file."""
        os.ftruncate(self._fd, 0)
        self.end = self.committed_end = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def drop(self) -> None:
        """Remove the journal once everything it committed is recorded in the state file."""
        self.close()
        self.end = self.committed_end = 0
        self.path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)


def _write_all(fd: int, pieces: list[bytes | memoryview], at: int) -> int:
    """Write PIECES in order at AT with pwritev: the record head and its data are never joined."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    total = 0
    while views:
        done = os.pwritev(fd, views, at + total)
        total += done
        while views and done >= len(views[0]):
            done -= len(views.pop(0))
        if done:
            views[0] = views[0][done:]
    return total


def read_records(path: Path, start: int = 0, stop: int | None = None) -> Iterator[Record]:
    """Every intact record in order from byte START (to STOP), ending at the first torn or
    damaged one."""
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while stop is None or pos < stop:
            head = f.read(HEAD_SIZE)
            if len(head) < HEAD_SIZE:
                return
            magic, kind, offset, length, epoch, dlen = _RECORD.unpack_from(head)
            (crc,) = _CRC.unpack_from(head, _RECORD.size)
            if magic != MAGIC or kind not in Kind.__members__.values():
                return
            data = f.read(dlen)
            if len(data) != dlen:
                return
            if crc32c.crc32c(data, value=crc32c.crc32c(head[: _RECORD.size])) != crc:
                return
            pos += HEAD_SIZE + dlen
            yield Record(Kind(kind), offset, length, epoch, data)


def last_commit(path: Path) -> tuple[int, int] | None:
    """(epoch, end offset) of the last intact COMMIT record, or None (missing or uncommitted):
    the records before that offset are the journal's committed content."""
    if not path.exists():
        return None
    found, pos = None, 0
    for record in read_records(path):
        pos += HEAD_SIZE + len(record.data)
        if record.kind is Kind.COMMIT:
            found = (record.epoch, pos)
    return found


def committed_epoch(path: Path) -> int | None:
    """The last epoch a journal commits, or None (missing, torn or uncommitted)."""
    found = last_commit(path)
    return found[0] if found is not None else None
