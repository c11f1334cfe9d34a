"""The staging journal of a shadow volume: epochs are made durable here before they touch the
image, so a crash at any instruction leaves the image recoverable to an epoch boundary.

The file is preallocated once and written in place from its start again after every
checkpoint (a *round*), with O_DIRECT|O_DSYNC when the file system takes it: a commit is one
aligned write that is durable when it returns, with no file-size or block-allocation change to
sync (appending to a file and fdatasyncing it commits file-system metadata every time).
An epoch too big for the staging buffer writes each full buffer directly too (not through the
page cache: no copy into it, no writeback of it at the commit) and its commit ends with an
fdatasync.

Records, little-endian: magic "SBJ2", kind u8, 3 zero bytes, round u64, seq u64, offset u64,
length u64, epoch u64, data length u32, crc32c u32 of the preceding 52 bytes and the data,
*seeded with the previous record's crc* (0 for the first); then the data. A round's records
start at offset 0 with seq 0, all carry the round's random id, and each seq is the previous
one plus one. A COMMIT record (the epoch) seals every record before it; its data is zero
padding to the next ALIGN boundary, and it is written with the records not yet on disk in one
synchronous write (or a write and an fdatasync): that is the epoch's durability point.
An EXTENTS record holds a whole EXTENT frame of the stream as it was checked: its head (extent
count, extent list and block crcs, big-endian, as on the wire) and its data, raw; its offset
and length are the frame's (the first extent's offset, the data's length).

Reading follows the chain from offset 0 and stops at the first record that does not continue
it: torn or damaged (crc), of an older round or a voided tail (round, seq, or the crc seed:
a record written after an earlier one was lost was seeded with the lost one's crc). So what a
crash leaves past the last durable COMMIT, and whatever older rounds left further on in the
file, is never taken for part of the journal. Records after the last COMMIT of the chain are
an incomplete epoch, never applied.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import crc32c

from shadowblk.delta.extents import Extents

MAGIC = b"SBJ2"
OLD_MAGIC = b"SBJR"  # appended records, before the preallocated journal
_RECORD = struct.Struct("<4sB3xQQQQQI")
_CRC = struct.Struct("<I")
HEAD_SIZE = _RECORD.size + _CRC.size
ALIGN = 4096  # O_DIRECT's unit: every write starts and ends on it
PREALLOC = 16 << 20  # the file's size from its creation; it grows by this much when needed
BUFFER = 4 << 20  # staged records waiting for the next write (a commit or a full buffer)
MAX_DATA = BUFFER  # a record's data is at most an extent (1 MiB): a longer length is damage


class Kind(IntEnum):
    DATA = 1
    ZERO = 2
    TRIM = 3
    COMMIT = 4
    EXTENTS = 5  # one checked EXTENT frame: head, then data (many scattered runs, one record)


@dataclass(frozen=True)
class Record:
    kind: Kind
    offset: int
    length: int
    epoch: int
    data: bytes | memoryview | Extents  # Extents: an EXTENTS record held in memory, unpacked


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_direct(path: Path) -> int:
    """PATH for writes that bypass the page cache where the file system allows."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600)
    except OSError as exc:  # tmpfs and a few others refuse O_DIRECT
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, flags, 0o600)


class Journal:
    """Stages records in an aligned buffer at `end`; commit() makes them durable.

    An epoch that fits in the buffer reaches the disk in its commit's one direct write (with
    RWF_DSYNC). A bigger one spills each full buffer with a direct write, not synchronous (the
    staging caller runs in a worker thread), and its commit ends with an fdatasync instead."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1  # direct I/O (where possible)
        self._spilled = False  # buffers of the epoch being staged were written without a sync
        self._allocated = 0
        self._buf = mmap.mmap(-1, BUFFER)  # page-aligned, as O_DIRECT wants
        self._buf_at = 0  # file offset of the buffer's first byte (aligned)
        self._buf_len = 0
        self.end = 0  # where the next record goes
        self.committed_end = 0  # just after the last COMMIT record written by this object
        self._round = 0
        self._seq = 0  # of the next record
        self._crc = 0  # of the last record: the next one's seed
        self._committed = (0, 0)  # (seq, crc) to continue from after the last COMMIT

    def begin(self) -> None:
        """Stage after the committed records: anything staged but not committed is void."""
        if self._fd < 0:
            created = not self.path.exists()
            self._fd = _open_direct(self.path)
            if created:  # a commit syncs the file, not its name: an acknowledged epoch in a
                fsync_dir(self.path.parent)  # journal whose entry was lost would be lost too
            self._allocated = os.fstat(self._fd).st_size
            self._reserve(PREALLOC)
            self._new_round()
        self.end = self._buf_at = self.committed_end
        self._buf_len = 0
        self._seq, self._crc = self._committed
        self._spilled = False

    def _new_round(self) -> None:
        self._round = int.from_bytes(os.urandom(8), "little")
        self.end = self.committed_end = self._buf_at = self._buf_len = 0
        self._seq = self._crc = 0
        self._committed = (0, 0)

    def append(
        self, kind: Kind, offset: int, length: int, epoch: int, data: bytes | memoryview = b""
    ) -> None:
        self.append_parts(kind, offset, length, epoch, (data,))

    def append_parts(
        self,
        kind: Kind,
        offset: int,
        length: int,
        epoch: int,
        parts: tuple[bytes | memoryview, ...],
    ) -> None:
        """One record whose data is PARTS, concatenated (an EXTENTS record: a frame's head and
        its data, never joined into one buffer first)."""
        size = sum(len(part) for part in parts)
        head = _RECORD.pack(MAGIC, int(kind), self._round, self._seq, offset, length, epoch, size)
        crc = crc32c.crc32c(head, value=self._crc)
        for part in parts:
            crc = crc32c.crc32c(part, value=crc)
        self._put(head + _CRC.pack(crc))
        for part in parts:
            self._put(part)
        self._seq += 1
        self._crc = crc
        self.end += HEAD_SIZE + size

    def room(self) -> int:
        """Bytes that can be staged before the buffer must be written out."""
        return BUFFER - self._buf_len

    def _put(self, data: bytes | memoryview) -> None:
        end = self._buf_len + len(data)
        if end <= BUFFER:  # the usual case: it fits
            self._buf[self._buf_len : end] = data
            self._buf_len = end
            return
        view = memoryview(data).cast("B")
        while view:
            if self._buf_len == BUFFER:
                self._write_out(final=False)
            n = min(len(view), BUFFER - self._buf_len)
            self._buf[self._buf_len : self._buf_len + n] = view[:n]
            self._buf_len += n
            view = view[n:]

    def _write_out(self, final: bool) -> None:
        """Write the buffer's aligned part (all of it when FINAL, its end being aligned then)."""
        size = self._buf_len if final else self._buf_len - self._buf_len % ALIGN
        if not size:
            return
        self._reserve(self._buf_at + size)
        dsync = final and not self._spilled  # the one write of a commit: durable on return
        self._spilled = not final
        done = 0
        while done < size:
            view = memoryview(self._buf)[done:size]
            at = self._buf_at + done
            flags = os.RWF_DSYNC if dsync else 0
            wrote = os.pwritev(self._fd, [view], at, flags)
            if wrote % ALIGN:  # the rest would be a misaligned direct write: stop here
                raise OSError(errno.EIO, f"{self.path}: short journal write of {wrote} bytes")
            done += wrote
        if final and not dsync:
            os.fdatasync(self._fd)
        tail = self._buf_len - size
        if tail:
            self._buf.move(0, size, tail)
        self._buf_at += size
        self._buf_len = tail

    def _reserve(self, size: int) -> None:
        """Blocks up to SIZE allocated before writing there: once written, an in-place write
        changes no metadata that a commit would have to sync. (The first commits into a new
        allocation sync its size and extents with them: RWF_DSYNC and fdatasync both do.)"""
        if size <= self._allocated:
            return
        size = -(-size // PREALLOC) * PREALLOC
        os.posix_fallocate(self._fd, 0, size)
        self._allocated = size

    def commit(self, epoch: int) -> None:
        """Seal the staged records durably: after this returns, recovery will apply them."""
        pad = -(self.end + HEAD_SIZE) % ALIGN
        self.append(Kind.COMMIT, 0, 0, epoch, bytes(pad))
        self._write_out(final=True)  # durable on return
        self.committed_end = self.end
        self._committed = (self._seq, self._crc)

    def reset(self) -> None:
        """Empty the journal once what it committed is on the image and in the state file: a
        new round from offset 0, whose first block is wiped (not synced: until that reaches
        the disk, the old round's commits are all at or below the state's epoch)."""
        if self._fd < 0:
            if not self.path.exists():
                return
            self.begin()
        self._new_round()
        self._buf[:ALIGN] = bytes(ALIGN)
        os.pwrite(self._fd, memoryview(self._buf)[:ALIGN], 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_records(path: Path, start: int = 0, stop: int | None = None) -> Iterator[Record]:
    """The records of the journal's chain that lie from byte START (to STOP), in order,
    ending where the chain ends."""
    for pos, record in _chain(path):
        if stop is not None and pos >= stop:
            return
        if pos >= start:
            yield record


def _chain(path: Path) -> Iterator[tuple[int, Record]]:
    """(offset, record) of every record continuing the chain from offset 0."""
    with open(path, "rb") as f:
        pos, seq, crc, round_id = 0, 0, 0, None
        while True:
            head = f.read(HEAD_SIZE)
            if len(head) < HEAD_SIZE:
                return
            magic, kind, rid, rseq, offset, length, epoch, dlen = _RECORD.unpack_from(head)
            (stored,) = _CRC.unpack_from(head, _RECORD.size)
            if magic != MAGIC or kind not in Kind.__members__.values() or rseq != seq:
                return
            if dlen > MAX_DATA:
                return
            if round_id is not None and rid != round_id:
                return
            data = f.read(dlen)
            if len(data) != dlen:
                return
            crc = crc32c.crc32c(data, value=crc32c.crc32c(head[: _RECORD.size], value=crc))
            if crc != stored:
                return
            yield pos, Record(Kind(kind), offset, length, epoch, data)
            pos += HEAD_SIZE + dlen
            seq, round_id = seq + 1, rid


def older_format(path: Path) -> bool:
    """A journal written by an older version ("SBJR" records, appended): its commits would not
    be read here, and they may hold acknowledged epochs."""
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        return f.read(4) == OLD_MAGIC
    return False


def last_commit(path: Path) -> tuple[int, int] | None:
    """(epoch, end offset) of the chain's last COMMIT record, or None (missing or uncommitted):
    the records before that offset are the journal's committed content."""
    if not path.exists():
        return None
    found = None
    for pos, record in _chain(path):
        if record.kind is Kind.COMMIT:
            found = (record.epoch, pos + HEAD_SIZE + len(record.data))
    return found


def committed_epoch(path: Path) -> int | None:
    """The last epoch a journal commits, or None (missing, torn or uncommitted)."""
    found = last_commit(path)
    return found[0] if found is not None else None
