"""Dirty-block bitmaps: which blocks of a volume were written since the last cut.

Offsets and lengths are bytes; a range dirties every block it touches. `DirtyBitmap` is the
fast one, `ReferenceBitmap` the plain-Python model the property tests compare it with. Both
save to the same checksummed file format, so a file written by one loads into the other.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Self

import crc32c
import numpy as np

from shadowblk._native import bitmap as _native

MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 20
MAX_SIZE = 1 << 50  # 1 PiB: keeps the top-level table of the fast bitmap small
PAGE_BLOCKS = 1 << 15  # blocks per page in the file format (and in the fast path)
PAGE_BYTES = PAGE_BLOCKS // 8

MAGIC = b"SHBLKBMP"
VERSION = 1
_HEADER = struct.Struct("<8sHHIQII")  # magic, version, 0, block size, size, page blocks, 0
_U64 = struct.Struct("<Q")  # a page index; the page count in the trailer
_CRC = struct.Struct("<I")


class BitmapCorruptError(ValueError):
    """A saved bitmap that is torn, corrupt or of another version: it is never trusted."""


def check_geometry(size: int, block_size: int) -> None:
    """Refuse geometries the bitmap cannot represent, with a message naming the bad value."""
    if not isinstance(size, int) or not isinstance(block_size, int):
        raise TypeError("size and block_size must be integers")
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} is not a power of two in 512..1 MiB")
    if size <= 0 or size > MAX_SIZE:
        raise ValueError(f"size {size} is not in 1..{MAX_SIZE} bytes")


def check_range(offset: int, length: int, size: int) -> None:
    """Refuse a byte range that is empty or leaves the volume."""
    if offset < 0 or length <= 0:
        raise ValueError(f"bad range offset={offset} length={length}: need offset >= 0, length > 0")
    if offset + length > size:
        raise ValueError(
            f"range offset={offset} length={length} ends at {offset + length}, "
            f"beyond the volume size {size}"
        )


def check_max_length(max_length: int | None, block_size: int) -> int | None:
    """The extent cap in bytes, rounded down to whole blocks (None means no cap)."""
    if max_length is None:
        return None
    if max_length < block_size:
        raise ValueError(f"max_length {max_length} is smaller than the block size {block_size}")
    return max_length - max_length % block_size


# --- the file format ------------------------------------------------------------------------
# header, then one record per non-empty page in increasing order (u64 page index, PAGE_BYTES of
# bits: block i of the page is bit i % 8 of byte i // 8), then the trailer: the number of pages
# and the crc32c of everything before the crc. Little-endian. Written as a stream, so saving
# needs no second copy of the bitmap.


def write_file(
    path: str | os.PathLike[str], size: int, block_size: int, pages: Iterable, durable: bool = True
) -> None:
    """Write (page index, bits) pairs atomically: temp file, fsync, rename, fsync the folder.
    Not DURABLE: without the fsyncs (readers see it at once; a power loss may not keep it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            crc = _write(out, _HEADER.pack(MAGIC, VERSION, 0, block_size, size, PAGE_BLOCKS, 0), 0)
            npages = 0
            for index, bits in pages:
                crc = _write(out, _U64.pack(index), crc)
                crc = _write(out, bits, crc)
                npages += 1
            crc = _write(out, _U64.pack(npages), crc)
            out.write(_CRC.pack(crc))
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write(out: BinaryIO, data: bytes, crc: int) -> int:
    out.write(data)
    return crc32c.crc32c(data, value=crc)


def read_file(path: str | os.PathLike[str]) -> tuple[int, int, list[tuple[int, bytes]]]:
    """(size, block_size, pages) of a saved bitmap, every field checked before it is used."""
    data = Path(path).read_bytes()
    trailer = _U64.size + _CRC.size
    if len(data) < _HEADER.size + trailer:
        raise BitmapCorruptError(f"{path}: {len(data)} bytes, too short for a bitmap file")
    magic, version, _, block_size, size, page_blocks, _ = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BitmapCorruptError(f"{path}: not a shadowblk bitmap (magic {magic!r})")
    if version != VERSION:
        raise BitmapCorruptError(f"{path}: bitmap format version {version}, expected {VERSION}")
    record = _U64.size + PAGE_BYTES
    (npages,) = _U64.unpack_from(data, len(data) - trailer)
    (stored,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if len(data) != _HEADER.size + npages * record + trailer:
        raise BitmapCorruptError(f"{path}: {len(data)} bytes do not hold {npages} pages (torn?)")
    if crc32c.crc32c(memoryview(data)[: -_CRC.size]) != stored:
        raise BitmapCorruptError(f"{path}: checksum mismatch")
    try:
        check_geometry(size, block_size)
    except ValueError as exc:
        raise BitmapCorruptError(f"{path}: {exc}") from None
    if page_blocks != PAGE_BLOCKS:
        raise BitmapCorruptError(f"{path}: {page_blocks} blocks per page, expected {PAGE_BLOCKS}")
    nblocks = -(-size // block_size)
    last_page = (nblocks - 1) // PAGE_BLOCKS
    pages: list[tuple[int, bytes]] = []
    pos = _HEADER.size
    for _ in range(npages):
        (index,) = _U64.unpack_from(data, pos)
        bits = data[pos + _U64.size : pos + record]
        pos += record
        if index > last_page or (pages and index <= pages[-1][0]):
            raise BitmapCorruptError(f"{path}: page index {index} out of order or out of range")
        if index == last_page and _bits_past(bits, nblocks - index * PAGE_BLOCKS):
            raise BitmapCorruptError(f"{path}: blocks marked beyond the end of the volume")
        pages.append((index, bits))
    return size, block_size, pages


def _bits_past(bits: bytes, used: int) -> bool:
    """Whether any bit at or after position `used` is set."""
    flags = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
    return bool(flags[used:].any())


# --- the reference model --------------------------------------------------------------------


class ReferenceBitmap:
    """The dirty bitmap as a set of block indexes: obviously right, slow, for tests."""

    def __init__(self, size: int, block_size: int = 4096) -> None:
        check_geometry(size, block_size)
        self._size = size
        self._block_size = block_size
        self._blocks: set[int] = set()
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def nblocks(self) -> int:
        return -(-self._size // self._block_size)

    def _touched(self, offset: int, length: int) -> range:
        check_range(offset, length, self._size)
        return range(offset // self._block_size, (offset + length - 1) // self._block_size + 1)

    def mark(self, offset: int, length: int) -> None:
        """Dirty every block the range touches."""
        blocks = self._touched(offset, length)
        with self._lock:
            self._blocks.update(blocks)

    def mark_many(self, offsets: Iterable[int], lengths: Iterable[int]) -> None:
        """Mark each (offset, length) pair; all are checked before any is marked."""
        offsets, lengths = list(offsets), list(lengths)
        if len(offsets) != len(lengths):
            raise ValueError(f"{len(offsets)} offsets but {len(lengths)} lengths")
        ranges = [self._touched(int(o), int(n)) for o, n in zip(offsets, lengths, strict=True)]
        with self._lock:
            for blocks in ranges:
                self._blocks.update(blocks)

    def clear(self, offset: int, length: int) -> None:
        """Clean the blocks the range covers entirely (a range reaching the volume's end covers
        its last, partial block), so a clear never drops a mark outside the range."""
        check_range(offset, length, self._size)
        bs = self._block_size
        first = -(-offset // bs)
        end = self.nblocks if offset + length == self._size else (offset + length) // bs
        with self._lock:
            self._blocks.difference_update(range(first, end))

    def test(self, offset: int, length: int = 1) -> bool:
        """Whether any block the range touches is dirty."""
        blocks = self._touched(offset, length)
        with self._lock:
            return any(b in self._blocks for b in blocks)

    def count(self) -> int:
        """Number of dirty blocks."""
        return len(self._blocks)

    def extents(self, max_length: int | None = None) -> Iterator[tuple[int, int]]:
        """Runs of dirty blocks as (offset, length) in bytes, at most max_length long each."""
        cap = check_max_length(max_length, self._block_size)
        with self._lock:
            blocks = sorted(self._blocks)
        bs = self._block_size
        i = 0
        while i < len(blocks):
            j = i
            while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
                j += 1
            start, end = blocks[i] * bs, min((blocks[j] + 1) * bs, self._size)
            while start < end:
                stop = end if cap is None else min(end, start + cap)
                yield start, stop - start
                start = stop
            i = j + 1

    def union(self, other: ReferenceBitmap) -> None:
        """Add the other bitmap's dirty blocks to this one."""
        if not isinstance(other, ReferenceBitmap):
            raise TypeError(f"cannot union a ReferenceBitmap with {type(other).__name__}")
        if (other.size, other.block_size) != (self._size, self._block_size):
            raise ValueError(
                f"geometry differs: size/block size {other.size}/{other.block_size} "
                f"vs {self._size}/{self._block_size}"
            )
        with other._lock:
            blocks = set(other._blocks)
        with self._lock:
            self._blocks |= blocks

    def cut(self) -> Self:
        """Hand back the current set and leave this bitmap empty, atomically."""
        fresh = type(self)(self._size, self._block_size)
        with self._lock:
            fresh._blocks, self._blocks = self._blocks, set()
        return fresh

    def copy(self) -> Self:
        twin = type(self)(self._size, self._block_size)
        with self._lock:
            twin._blocks = set(self._blocks)
        return twin

    def _pages(self) -> Iterator[tuple[int, bytes]]:
        with self._lock:
            blocks = np.array(sorted(self._blocks), dtype=np.int64)
        for index in np.unique(blocks // PAGE_BLOCKS):
            flags = np.zeros(PAGE_BLOCKS, dtype=np.uint8)
            inside = blocks[(blocks // PAGE_BLOCKS) == index] - index * PAGE_BLOCKS
            flags[inside] = 1
            yield int(index), np.packbits(flags, bitorder="little").tobytes()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Persist atomically in the checksummed bitmap format."""
        write_file(path, self._size, self._block_size, self._pages())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Read a saved bitmap; BitmapCorruptError if the file is not exactly what save wrote."""
        size, block_size, pages = read_file(path)
        bitmap = cls(size, block_size)
        for index, bits in pages:
            flags = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
            bitmap._blocks.update((np.flatnonzero(flags) + index * PAGE_BLOCKS).tolist())
        return bitmap


class DirtyBitmap(_native.Bitmap):
    """The bitmap the data path uses: C pages allocated as blocks get dirty (see csrc/bitmap.pyx).

    Thread-safe under the GIL: a mark made while another thread calls cut() lands either in the
    set cut() returns or in the one left behind, never nowhere. Cython code (a csrc/*.pyx) can
    skip the Python call: `from shadowblk._native.bitmap cimport Bitmap`, then
    `(<Bitmap>bitmap).mark_range(offset, length)`, declared in csrc/shadowblk/_native/bitmap.pxd.
    """

    def __repr__(self) -> str:
        return f"DirtyBitmap(size={self.size}, block_size={self.block_size}, dirty={self.count()})"

    def save(self, path: str | os.PathLike[str], durable: bool = True) -> None:
        """Persist atomically in the checksummed bitmap format (save a cut() or copy() of a
        bitmap that is still being marked, for a stable snapshot); see write_file."""
        write_file(path, self.size, self.block_size, self._pages(), durable)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Read a saved bitmap; BitmapCorruptError if the file is not exactly what save wrote."""
        size, block_size, pages = read_file(path)
        bitmap = cls(size, block_size)
        for index, bits in pages:
            bitmap._or_page(index, bits)
        return bitmap
