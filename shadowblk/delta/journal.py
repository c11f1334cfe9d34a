"""The staging journal of a shadow volume: an epoch is made durable here before it touches the
image, so a crash at any instruction leaves the image at an epoch boundary.

File: a sequence of records, little-endian: magic "SBJR", kind u8, 3 zero bytes, offset u64,
length u64, epoch u64, data length u32, crc32c u32 of the preceding 36 bytes and the data; then
the data. A COMMIT record (the epoch) ends a complete journal; it is written and fsynced only
once every frame of the epoch is staged. Without a valid COMMIT the journal is discarded.
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
    """Appends records for the epoch being staged; commit() makes them durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def begin(self) -> None:
        """Start staging from nothing (an uncommitted journal is worthless and dropped)."""
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def append(
        self, kind: Kind, offset: int, length: int, epoch: int, data: bytes | memoryview = b""
    ) -> None:
        head = _RECORD.pack(MAGIC, int(kind), offset, length, epoch, len(data))
        crc = crc32c.crc32c(data, value=crc32c.crc32c(head))
        _write_all(self._fd, [head + _CRC.pack(crc), data])

    def commit(self, epoch: int) -> None:
        """Seal the staged epoch durably: after this returns, recovery will apply it."""
        self.append(Kind.COMMIT, 0, 0, epoch)
        os.fdatasync(self._fd)  # the records and the file's length: all recovery reads

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def drop(self) -> None:
        """Remove the journal once its epoch is applied and recorded in the state file."""
        self.close()
        self.path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)


def _write_all(fd: int, pieces: list[bytes | memoryview]) -> None:
    """Write PIECES in order with writev: the record head and its data are never joined."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    while views:
        done = os.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views.pop(0))
        if done:
            views[0] = views[0][done:]


def read_records(path: Path) -> Iterator[Record]:
    """Every intact record in order, stopping at the first torn or damaged one."""
    with open(path, "rb") as f:
        while True:
            head = f.read(_RECORD.size + _CRC.size)
            if len(head) < _RECORD.size + _CRC.size:
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
            yield Record(Kind(kind), offset, length, epoch, data)


def committed_epoch(path: Path) -> int | None:
    """The epoch a complete journal commits, or None (missing, torn or uncommitted)."""
    if not path.exists():
        return None
    last = None
    for record in read_records(path):
        last = record
    return last.epoch if last is not None and last.kind is Kind.COMMIT else None
