"""Changes read from the volume itself: the full sync of a new shadow and the resync of one that
fell behind. Both read blocks while writes go on, so the shipper only commits them together
with an epoch cut after the reading ended (see docs/protocol.md, "resync")."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import zstandard

from shadowblk.delta.epoch import Change, data_changes, piece_changes
from shadowblk.delta.frames import MAX_EXTENT, FrameType
from shadowblk.tracking.bitmap import DirtyBitmap


def _read(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(errno.EIO, f"short read of the volume at {offset}")
    return data


def segments(fd: int, size: int, bs: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_hole) covering the volume, holes found with SEEK_DATA/SEEK_HOLE and
    shrunk to whole blocks; a volume that cannot tell is all data."""
    pos = 0
    while pos < size:
        try:
            found = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                found = size
            elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size - pos, False
                return
            else:
                raise
        start = min(found - found % bs, size)
        if start > pos:
            yield pos, start - pos, True
            pos = start
            continue
        hole = min(os.lseek(fd, found, os.SEEK_HOLE), size)
        hole = min(-(-hole // bs) * bs, size)
        yield pos, hole - pos, False
        pos = hole


def full_sync(
    fd: int, size: int, bs: int, compressor: zstandard.ZstdCompressor, progress: list[int]
) -> Iterator[Change]:
    """Every block of the volume: holes as TRIM, zero runs as ZERO, the rest as EXTENT.
    PROGRESS[0] counts the bytes covered so far."""
    for offset, length, hole in segments(fd, size, bs):
        if hole:
            yield Change(FrameType.TRIM, offset, length)
            progress[0] += length
            continue
        for start in range(offset, offset + length, MAX_EXTENT):
            n = min(MAX_EXTENT, offset + length - start)
            yield from data_changes(start, _read(fd, start, n), bs, compressor)
            progress[0] += n


def resync(
    fd: int, lacks: DirtyBitmap, compressor: zstandard.ZstdCompressor, progress: list[int]
) -> Iterator[Change]:
    """The blocks a shadow lacks, read from the volume now; scattered runs share frames."""
    bs = lacks.block_size
    batch: list[tuple[int, int]] = []
    total = 0
    for offset, length in lacks.extents(max_length=MAX_EXTENT):
        if total + length > MAX_EXTENT:
            yield from _read_runs(fd, batch, bs, compressor)
            progress[0] += total
            batch, total = [], 0
        batch.append((offset, length))
        total += length
    if batch:
        yield from _read_runs(fd, batch, bs, compressor)
        progress[0] += total


def _read_runs(
    fd: int, batch: list[tuple[int, int]], bs: int, compressor: zstandard.ZstdCompressor
) -> Iterator[Change]:
    """The changes of the runs BATCH (sorted, disjoint) as the volume holds them now."""
    pieces = [(o // bs, (o + n) // bs, _read(fd, o, n)) for o, n in batch]
    return iter(piece_changes(pieces, bs, compressor))
