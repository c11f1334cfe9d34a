"""An epoch's content as the primary captured it: the latest data per block written in it.

Capturing the data at write time (rather than reading the volume after the cut) is what makes
an epoch a point-in-time image: later writes go to the next epoch and cannot leak into this one.
A write is captured as one run (one copy of its bytes, whatever its length), and a later write
trims the runs it overlaps, so a block rewritten within an epoch is held, and travels, once.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

import zstandard

from shadowblk._native.framepack import pack_frame
from shadowblk.delta.extents import encode_packed
from shadowblk.delta.frames import MAX_EXTENT, FrameType

COMPRESS_THREADS = 2  # zstd releases the GIL: an epoch's frames are made on this many threads


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


Piece = tuple[int, int, bytes | memoryview]  # (first block, end block, data of those blocks)


@dataclass
class Epoch:
    """Data blocks and ZERO/TRIM ranges, always disjoint: a later change replaces an earlier
    one where they overlap. A write of one block is a dict entry (a random writer's many small
    writes cost a dict store each); a longer one is one run of a sorted list (a 1 MiB write is
    one entry, not 256); ranges stay ranges, so discarding a whole volume costs one entry."""

    block_size: int = 4096
    number: int = 0  # 0 while open; assigned at the cut
    blocks: dict[int, bytes] = field(default_factory=dict)  # single blocks
    starts: list[int] = field(default_factory=list)  # run i holds blocks [starts[i], ends[i])
    ends: list[int] = field(default_factory=list)
    datas: list[bytes | memoryview] = field(default_factory=list)
    marks: list[tuple[int, int, Mark]] = field(default_factory=list)  # sorted [start, end)
    nbytes: int = 0  # captured data bytes (the lag budget counts these)
    opened: float = field(default_factory=time.monotonic)
    closed: float = 0.0
    _made: list[Change | Future[list[Change]]] | None = None
    _making: threading.Lock = field(default_factory=threading.Lock)

    @property
    def empty(self) -> bool:
        return not self.blocks and not self.starts and not self.marks

    def put(self, block: int, data: bytes) -> None:
        """One whole block (DATA is kept, not copied: the caller's own bytes)."""
        if self.marks:
            self._unmark(block, block + 1)
        if self.starts:
            self._carve_runs(block, block + 1)
        old = self.blocks.get(block)
        self.nbytes += len(data) - (len(old) if old is not None else 0)
        self.blocks[block] = data

    def put_run(self, start: int, data: bytes | memoryview) -> None:
        """Whole blocks from block START, copied once (DATA may be a client's reused buffer)."""
        end = start + len(data) // self.block_size
        if end - start == 1:
            self.put(start, bytes(data))
            return
        if self.marks:
            self._unmark(start, end)
        self._drop_blocks(start, end)
        i, j, kept = self._carve(start, end)
        kept.insert(1 if kept and kept[0][0] < start else 0, (start, end, bytes(data)))
        self._splice(i, j, kept)
        self.nbytes += (end - start) * self.block_size

    def mark(self, start: int, end: int, mark: Mark) -> None:
        """Blocks [start, end) read as zeros from now on (ZERO) or are discarded (TRIM)."""
        self._drop_blocks(start, end)
        self._carve_runs(start, end)
        self._unmark(start, end)
        bisect.insort(self.marks, (start, end, mark), key=lambda m: m[0])

    def block_at(self, block: int) -> bytes | None:
        """The block's captured data, None if this epoch holds no data for it."""
        data = self.blocks.get(block)
        if data is not None:
            return data
        i = bisect.bisect_right(self.starts, block) - 1
        if i < 0 or block >= self.ends[i]:
            return None
        at = (block - self.starts[i]) * self.block_size
        return bytes(memoryview(self.datas[i])[at : at + self.block_size])

    def mark_at(self, block: int) -> Mark | None:
        i = bisect.bisect_right(self.marks, block, key=lambda m: m[0]) - 1
        if i >= 0 and self.marks[i][0] <= block < self.marks[i][1]:
            return self.marks[i][2]
        return None

    def ranges(self) -> list[tuple[int, int]]:
        """Every block range this epoch changes, as (start, end) block numbers."""
        return (
            [(b, b + 1) for b in self.blocks]
            + list(zip(self.starts, self.ends, strict=True))
            + [(s, e) for s, e, _ in self.marks]
        )

    def pieces(self) -> list[Piece]:
        """Every data block as (start, end, data), sorted: the single blocks and the runs."""
        singles = [(b, b + 1, self.blocks[b]) for b in sorted(self.blocks)]
        if not self.starts:
            return singles
        runs = list(zip(self.starts, self.ends, self.datas, strict=True))
        return sorted(singles + runs, key=lambda p: p[0]) if singles else runs

    def _drop_blocks(self, start: int, end: int) -> None:
        """Forget the single blocks in [start, end)."""
        blocks = self.blocks
        if not blocks:
            return
        inside = (
            [b for b in range(start, end) if b in blocks]
            if end - start <= len(blocks)
            else [b for b in blocks if start <= b < end]
        )
        for b in inside:
            self.nbytes -= len(blocks.pop(b))

    def _carve_runs(self, start: int, end: int) -> None:
        i, j, kept = self._carve(start, end)
        if i < j:
            self._splice(i, j, kept)

    def _carve(self, start: int, end: int) -> tuple[int, int, list[Piece]]:
        """Runs i..j-1 overlap blocks [start, end): what is left of them outside it (at most a
        head and a tail, as views of their data); their bytes inside it leave nbytes."""
        i = bisect.bisect_right(self.ends, start)
        j = bisect.bisect_left(self.starts, end, lo=i)
        kept: list[Piece] = []
        if i == j:
            return i, j, kept
        bs = self.block_size
        self.nbytes -= sum(len(d) for d in self.datas[i:j])
        first, last = self.starts[i], self.ends[j - 1]
        if first < start:
            kept.append((first, start, _kept(self.datas[i], 0, (start - first) * bs)))
        if last > end:
            tail = (end - self.starts[j - 1]) * bs
            kept.append((end, last, _kept(self.datas[j - 1], tail, len(self.datas[j - 1]))))
        self.nbytes += sum(len(d) for _, _, d in kept)
        return i, j, kept

    def _splice(self, i: int, j: int, pieces: list[Piece]) -> None:
        self.starts[i:j] = [p[0] for p in pieces]
        self.ends[i:j] = [p[1] for p in pieces]
        self.datas[i:j] = [p[2] for p in pieces]

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

    def changes(self, level: int) -> Iterator[Change]:
        """The frames of this (closed) epoch, in order, made once and shared by every shadow.
        The first call hands every data frame to the compressor threads; the frames come out
        as they are done, in order. Changes in an epoch are disjoint, so their order does not
        matter to the shadow, only the stream's sequence numbers do (given when sent)."""
        with self._making:
            if self._made is None:  # stored only whole: a half-made list would drop data
                made: list[Change | Future[list[Change]]] = [
                    Change(
                        FrameType.ZERO if mark is Mark.ZERO else FrameType.TRIM,
                        s * self.block_size,
                        (e - s) * self.block_size,
                    )
                    for s, e, mark in self.marks
                ]
                frames = list(frame_pieces(self.pieces(), self.block_size))
                if len(frames) == 1:  # a small epoch: made here, without a thread hop
                    made += piece_changes(frames[0], self.block_size, _compressor(level))
                else:
                    made += [
                        _pool().submit(_make, pieces, self.block_size, level) for pieces in frames
                    ]
                self._made = made
            made = self._made
        for item in made:
            if isinstance(item, Future):
                try:
                    done = item.result()
                except BaseException:
                    self._forget(made)
                    raise
                yield from done
            else:
                yield item

    def _forget(self, made: list[Change | Future[list[Change]]]) -> None:
        """A frame failed to build: the next call makes them all again (a failure kept in its
        Future would refuse this epoch to every shadow for good)."""
        with self._making:
            if self._made is made:
                self._made = None


def _kept(data: bytes | memoryview, start: int, end: int) -> bytes | memoryview:
    """DATA[start:end], what a trimmed run keeps: a view, or a copy when the view would hold
    most of a bigger buffer alive for nothing (the memory held stays near nbytes)."""
    view = memoryview(data)
    if 2 * (end - start) < len(view.obj):  # the captured bytes a view came from
        return bytes(view[start:end])
    return view[start:end]


def frame_pieces(pieces: list[Piece], bs: int) -> Iterator[list[Piece]]:
    """Sorted, disjoint runs cut into frames of at most MAX_EXTENT bytes of data each (a run
    longer than what is left of a frame continues in the next one)."""
    per = MAX_EXTENT // bs
    frame: list[Piece] = []
    room = per
    for start, end, data in pieces:
        if end - start <= room:  # the usual case: the whole piece fits
            frame.append((start, end, data))
            room -= end - start
            if room == 0:
                yield frame
                frame, room = [], per
            continue
        view = memoryview(data)
        while start < end:
            n = min(end - start, room)
            frame.append((start, start + n, view[: n * bs] if n < end - start else view))
            view, start, room = view[n * bs :], start + n, room - n
            if room == 0:
                yield frame
                frame, room = [], per
    if frame:
        yield frame


def piece_changes(
    pieces: list[Piece], bs: int, compressor: zstandard.ZstdCompressor
) -> list[Change]:
    """One frame's runs as changes: ZERO for the runs of all-zero blocks, one EXTENT (an extent
    list over the adjacent runs merged) for the others, its payload made in one native pass
    (zero scan, copy, crcs: `csrc/framepack.pyx`)."""
    payload, head_len, offset, length, zeros = pack_frame(pieces, bs)
    out = [Change(FrameType.ZERO, o, n) for o, n in zeros]
    if payload is not None:
        payload, flags = encode_packed(payload, head_len, compressor)
        out.append(Change(FrameType.EXTENT, offset, length, payload, flags))
    return out


def data_changes(
    offset: int, data: bytes, bs: int, compressor: zstandard.ZstdCompressor
) -> list[Change]:
    """EXTENT frames for the non-zero blocks of DATA (at most MAX_EXTENT bytes) at OFFSET,
    ZERO frames for the zero runs."""
    first = offset // bs
    return piece_changes([(first, first + len(data) // bs, data)], bs, compressor)


_local = threading.local()
_pool_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _pool_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(COMPRESS_THREADS, thread_name_prefix="frames")
        return _executor


def _forget_pool() -> None:
    """In a forked child: the parent's compressor threads are not there."""
    global _executor, _pool_lock
    _executor, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for LEVEL (a compressor is not thread-safe)."""
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _make(pieces: list[Piece], bs: int, level: int) -> list[Change]:
    return piece_changes(pieces, bs, _compressor(level))
