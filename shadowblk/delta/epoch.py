"""An epoch's content as the primary captured it: the latest data per block written in it.

Capturing the data at write time (rather than reading the volume after the cut) is what makes
an epoch a point-in-time image: later writes go to the next epoch and cannot leak into this one.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from enum import Enum
from itertools import pairwise

import numpy as np
import zstandard

from shadowblk.delta.extents import encode_extent, runs, zero_blocks
from shadowblk.delta.frames import MAX_EXTENT, FrameType
from shadowblk.integrity.blockcrc import block_crc32c


class Mark(Enum):
    ZERO = "zero"
    TRIM = "trim"


@dataclass(frozen=True)
class Change:
    """One frame's worth of change, before sequencing: EXTENT, ZERO or TRIM."""

    type: FrameType
    offset: int
    length: int
    payload: bytes = b""


@dataclass
class Epoch:
    """Data blocks and ZERO/TRIM ranges, always disjoint: a later change replaces an earlier
    one where they overlap. Ranges stay ranges, so discarding a whole volume costs one entry."""

    number: int = 0  # 0 while open; assigned at the cut
    blocks: dict[int, bytes] = field(default_factory=dict)
    marks: list[tuple[int, int, Mark]] = field(default_factory=list)  # sorted [start, end)
    nbytes: int = 0  # captured data bytes (the lag budget counts these)
    opened: float = field(default_factory=time.monotonic)
    closed: float = 0.0
    _changes: list[Change] | None = None

    @property
    def empty(self) -> bool:
        return not self.blocks and not self.marks

    def put(self, block: int, data: bytes) -> None:
        if self.marks:
            self._unmark(block, block + 1)
        old = self.blocks.get(block)
        if old is not None:
            self.nbytes -= len(old)
        self.nbytes += len(data)
        self.blocks[block] = data

    def put_run(self, start: int, data: memoryview, bs: int) -> None:
        """Whole blocks from block START: `put` for each, with one pass over the ranges."""
        n = len(data) // bs
        if self.marks:
            self._unmark(start, start + n)
        blocks = self.blocks
        replaced = 0
        for i in range(n):
            old = blocks.get(start + i)
            if old is not None:
                replaced += len(old)
            blocks[start + i] = bytes(data[i * bs : (i + 1) * bs])
        self.nbytes += n * bs - replaced

    def mark(self, start: int, end: int, mark: Mark) -> None:
        """Blocks [start, end) read as zeros from now on (ZERO) or are discarded (TRIM)."""
        for block in [b for b in self.blocks if start <= b < end]:
            self.nbytes -= len(self.blocks.pop(block))
        self._unmark(start, end)
        bisect.insort(self.marks, (start, end, mark), key=lambda m: m[0])

    def mark_at(self, block: int) -> Mark | None:
        i = bisect.bisect_right(self.marks, block, key=lambda m: m[0]) - 1
        if i >= 0 and self.marks[i][0] <= block < self.marks[i][1]:
            return self.marks[i][2]
        return None

    def _unmark(self, start: int, end: int) -> None:
        lo = max(0, bisect.bisect_right(self.marks, start, key=lambda m: m[0]) - 1)
        hi = bisect.bisect_left(self.marks, end, key=lambda m: m[0])
        kept = []
        for s, e, m in self.marks[lo:hi]:
            if e <= start or s >= end:
                kept.append((s, e, m))
                continue
            if s < start:
                kept.append((s, start, m))
            if e > end:
                kept.append((end, e, m))
        self.marks[lo:hi] = kept

    def ranges(self) -> list[tuple[int, int]]:
        """Every block range this epoch changes, as (start, end) block numbers."""
        return [(b, b + 1) for b in self.blocks] + [(s, e) for s, e, _ in self.marks]

    def changes(self, block_size: int, compressor: zstandard.ZstdCompressor) -> list[Change]:
        """The frames of this (closed) epoch, built once and shared by every shadow. Changes
        in an epoch are disjoint, so their order does not matter."""
        if self._changes is None:
            marks = [
                Change(
                    FrameType.ZERO if mark is Mark.ZERO else FrameType.TRIM,
                    s * block_size,
                    (e - s) * block_size,
                )
                for s, e, mark in self.marks
            ]
            self._changes = marks + list(_data(self.blocks, block_size, compressor))
        return self._changes


def _data(blocks: dict[int, bytes], bs: int, compressor: zstandard.ZstdCompressor):
    """Runs of consecutive data blocks, as EXTENT (and ZERO for all-zero runs) changes. Which
    blocks are zero and their crc32c are found for the whole epoch in one pass each (a random
    writer's epoch is thousands of one-block runs)."""
    if not blocks:
        return
    order = np.array(sorted(blocks), dtype=np.int64)
    view = memoryview(b"".join([blocks[b] for b in order.tolist()]))
    zeros = zero_blocks(view, bs)
    crcs = block_crc32c(view, bs).astype(">u4")
    cuts = np.flatnonzero((np.diff(order) != 1) | (zeros[1:] != zeros[:-1])) + 1
    per = MAX_EXTENT // bs
    for i, j in pairwise([0, *cuts.tolist(), len(order)]):
        if zeros[i]:
            yield Change(FrameType.ZERO, int(order[i]) * bs, (j - i) * bs)
            continue
        for s in range(i, j, per):
            e = min(j, s + per)
            payload = encode_extent(view[s * bs : e * bs], bs, compressor, crcs[s:e].tobytes())
            yield Change(FrameType.EXTENT, int(order[s]) * bs, (e - s) * bs, payload)


def data_changes(offset: int, data: bytes, bs: int, compressor: zstandard.ZstdCompressor):
    """EXTENT frames for the non-zero runs of DATA at OFFSET, ZERO frames for the zero runs."""
    view = memoryview(data)
    for start, end, is_zero in runs(view, bs):
        if is_zero:
            yield Change(FrameType.ZERO, offset + start, end - start)
        else:
            payload = encode_extent(view[start:end], bs, compressor)
            yield Change(FrameType.EXTENT, offset + start, end - start, payload)
