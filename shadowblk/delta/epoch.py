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

from shadowblk.delta.extents import encode_extents, zero_blocks
from shadowblk.delta.frames import MAX_EXTENT, FrameType


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
    flags: int = 0


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
    """The epoch's data blocks as EXTENT frames of many runs each (and ZERO for all-zero runs):
    a random writer's epoch of thousands of one-block runs is a few frames. Each frame's data
    is joined from the captured blocks once (no copy of the whole epoch first)."""
    if not blocks:
        return
    order = sorted(blocks)
    pieces = [blocks[b] for b in order]
    zero = bytes(bs)
    zeros = np.array([piece == zero for piece in pieces], dtype=bool)
    yield from block_changes(np.array(order, dtype=np.int64), pieces, zeros, bs, compressor)


def data_changes(offset: int, data: bytes, bs: int, compressor: zstandard.ZstdCompressor):
    """EXTENT frames for the non-zero blocks of DATA at OFFSET, ZERO frames for the zero runs."""
    view = memoryview(data)
    pieces = [view[i : i + bs] for i in range(0, len(view), bs)]
    order = np.arange(len(pieces), dtype=np.int64) + offset // bs
    yield from block_changes(order, pieces, zero_blocks(view, bs), bs, compressor)


def block_changes(
    order: np.ndarray,
    pieces: list[bytes] | list[memoryview],
    zeros: np.ndarray,
    bs: int,
    compressor: zstandard.ZstdCompressor,
):
    """ZERO changes for the runs of zero blocks, EXTENT changes for the others, MAX_EXTENT
    bytes of data to a frame: ORDER the sorted block numbers, PIECES their data, ZEROS which
    of them are all zeros."""
    if zeros.any():
        cuts = np.flatnonzero((np.diff(order) != 1) | (zeros[1:] != zeros[:-1])) + 1
        for i, j in pairwise([0, *cuts.tolist(), len(order)]):
            if zeros[i]:
                yield Change(FrameType.ZERO, int(order[i]) * bs, (j - i) * bs)
        keep = np.flatnonzero(~zeros)
        order = order[keep]
        pieces = [pieces[i] for i in keep.tolist()]
    heads = np.ones(len(order), dtype=bool)
    heads[1:] = np.diff(order) != 1
    per = MAX_EXTENT // bs
    heads[::per] = True  # every frame starts a run
    for a in range(0, len(order), per):
        b = min(len(order), a + per)
        first = np.flatnonzero(heads[a:b])
        counts = np.diff(np.append(first, b - a))
        payload, flags = encode_extents(
            order[a + first].astype(np.uint64) * bs,
            counts * bs,
            pieces[a:b],
            bs,
            compressor,
        )
        yield Change(FrameType.EXTENT, int(order[a]) * bs, (b - a) * bs, payload, flags)
