"""DirtyBitmap against ReferenceBitmap: random operation sequences, geometries, errors, files,
threads."""

from __future__ import annotations

import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowblk.tracking.bitmap import (
    PAGE_BLOCKS,
    BitmapCorruptError,
    DirtyBitmap,
    ReferenceBitmap,
)

TIB = 1 << 40
MID_BLOCKS = PAGE_BLOCKS * 512  # blocks under one node of the fast table


def pair(size: int, block_size: int) -> tuple[DirtyBitmap, ReferenceBitmap]:
    return DirtyBitmap(size, block_size), ReferenceBitmap(size, block_size)


def same(fast: DirtyBitmap, ref: ReferenceBitmap, cap: int | None = None) -> None:
    assert fast.count() == ref.count()
    assert list(fast.extents(cap)) == list(ref.extents(cap))


# --- random operation sequences -------------------------------------------------------------


@st.composite
def geometries(draw: st.DrawFn) -> tuple[int, int]:
    block_size = draw(st.sampled_from([512, 4096, 65536, 1 << 20]))
    nblocks = draw(st.sampled_from([1, 3, PAGE_BLOCKS - 1, PAGE_BLOCKS + 5, 3 * PAGE_BLOCKS]))
    if block_size == 512 and draw(st.booleans()):
        nblocks = MID_BLOCKS + 2 * PAGE_BLOCKS  # crosses a node of the table
    tail = draw(st.integers(0, block_size - 1))  # a last partial block when > 0
    return nblocks * block_size - tail, block_size


@st.composite
def ranges(draw: st.DrawFn, size: int, block_size: int) -> tuple[int, int]:
    """Byte ranges that like page and node boundaries and the end of the volume."""
    nblocks = -(-size // block_size)
    edges = [0, nblocks - 1, PAGE_BLOCKS, 2 * PAGE_BLOCKS, MID_BLOCKS]
    anchor = draw(st.sampled_from([e for e in edges if e < nblocks]))
    block = min(nblocks - 1, max(0, anchor + draw(st.integers(-70, 70))))
    offset = block * block_size + draw(st.integers(0, block_size - 1))
    offset = min(offset, size - 1)
    span = draw(
        st.sampled_from([1, block_size, 3 * block_size, 100 * block_size, 40_000 * block_size])
    )
    length = draw(st.integers(1, max(1, min(span, size - offset))))
    return offset, length


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[tuple]]:
    size, block_size = draw(geometries())
    ops = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["mark", "mark", "mark_many", "clear", "test", "union", "cut"]))
        if kind == "mark_many":
            batch = draw(st.lists(ranges(size, block_size), min_size=0, max_size=8))
            ops.append((kind, batch))
        elif kind == "union":
            ops.append((kind, draw(st.lists(ranges(size, block_size), max_size=4))))
        elif kind == "cut":
            ops.append((kind,))
        else:
            ops.append((kind, draw(ranges(size, block_size))))
    return size, block_size, ops


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.sampled_from([None, 1, 2, 7, 40_000]))
def test_random_operations_match_the_reference(scenario: tuple, cap_blocks: int | None) -> None:
    size, block_size, ops = scenario
    fast, ref = pair(size, block_size)
    cap = None if cap_blocks is None else cap_blocks * block_size + block_size // 2
    for op in ops:
        kind = op[0]
        if kind == "mark":
            fast.mark(*op[1])
            ref.mark(*op[1])
        elif kind == "mark_many":
            offsets = np.array([o for o, _ in op[1]], dtype=np.uint64)
            lengths = [n for _, n in op[1]]
            fast.mark_many(offsets, lengths)
            ref.mark_many(offsets.tolist(), lengths)
        elif kind == "clear":
            fast.clear(*op[1])
            ref.clear(*op[1])
        elif kind == "test":
            assert fast.test(*op[1]) == ref.test(*op[1])
        elif kind == "union":
            other_fast, other_ref = pair(size, block_size)
            for r in op[1]:
                other_fast.mark(*r)
                other_ref.mark(*r)
            fast.union(other_fast)
            ref.union(other_ref)
        else:
            taken_fast, taken_ref = fast.cut(), ref.cut()
            same(taken_fast, taken_ref, cap)
            assert fast.count() == 0
        assert fast.count() == ref.count()
    same(fast, ref, cap)
    same(fast.copy(), ref.copy())
    with tempfile.TemporaryDirectory() as folder:  # each loads what the other saved
        fast.save(Path(folder) / "fast")
        ref.save(Path(folder) / "ref")
        same(DirtyBitmap.load(Path(folder) / "ref"), ReferenceBitmap.load(Path(folder) / "fast"))


# --- geometry and semantics -------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [512, 4096, 1 << 20])
def test_last_partial_block_is_clipped_at_the_volume_size(block_size: int) -> None:
    size = 10 * block_size + 123
    bitmap = DirtyBitmap(size, block_size)
    assert (bitmap.size, bitmap.block_size, bitmap.nblocks) == (size, block_size, 11)
    bitmap.mark(size - 1, 1)
    bitmap.mark(0, 1)
    assert list(bitmap.extents()) == [(0, block_size), (10 * block_size, 123)]
    bitmap.mark(block_size, 9 * block_size)
    assert list(bitmap.extents()) == [(0, size)]
    assert list(bitmap.extents(4 * block_size + 1)) == [
        (0, 4 * block_size),
        (4 * block_size, 4 * block_size),
        (8 * block_size, 2 * block_size + 123),
    ]


def test_partial_blocks_are_dirty_and_clear_only_drops_whole_blocks() -> None:
    bitmap = DirtyBitmap(64 * 1024, 4096)
    bitmap.mark(4095, 2)  # touches blocks 0 and 1
    assert list(bitmap.extents()) == [(0, 8192)]
    bitmap.clear(100, 8000)  # covers neither block entirely
    assert bitmap.count() == 2
    bitmap.clear(4096, 4096)
    assert list(bitmap.extents()) == [(0, 4096)]
    assert bitmap.test(4095) and not bitmap.test(4096, 60_000)


def test_sixteen_tib_volume_with_sparse_marks_stays_small() -> None:
    size = 16 * TIB
    bitmap = DirtyBitmap(size, 4096)
    offsets = np.linspace(0, size // 2, 200, dtype=np.uint64) // 4096 * 4096
    bitmap.mark_many(offsets, np.full(200, 4096, dtype=np.uint64))
    bitmap.mark(size - 1, 1)
    assert bitmap.count() == 201
    # 201 pages of 4 KiB, their nodes and the root table; a flat bitmap would be 512 MiB
    assert bitmap._memory() < 201 * 4096 + 201 * 8192 + 64 * 1024
    assert list(bitmap.extents())[-1] == (size - 4096, 4096)
    taken = bitmap.cut()
    assert taken.count() == 201 and bitmap.count() == 0
    assert bitmap._memory() <= 64 * 1024
    taken.clear(0, size)
    assert taken.count() == 0 and taken._memory() <= 64 * 1024


def test_largest_volume_with_smallest_blocks() -> None:
    size = 1 << 50  # 1 PiB in 512-byte blocks: 2**41 blocks
    bitmap = DirtyBitmap(size, 512)
    bitmap.mark(size - 1, 1)
    bitmap.mark(0, 1025)
    assert list(bitmap.extents()) == [(0, 1536), (size - 512, 512)]
    assert bitmap._memory() < 2 << 20
    with pytest.raises(ValueError, match="volume size"):
        bitmap.mark(size, 1)


def test_clear_frees_pages_that_become_empty() -> None:
    bitmap = DirtyBitmap(TIB, 4096)
    empty = bitmap._memory()
    bitmap.mark(0, 1 << 30)  # 8 pages
    assert bitmap._memory() > empty + 8 * 4096
    bitmap.clear(0, 1 << 30)
    assert bitmap._memory() == empty


@pytest.mark.parametrize("cls", [DirtyBitmap, ReferenceBitmap])
def test_bad_geometry_is_refused(cls: type) -> None:
    for block_size in (256, 3000, 2 << 20, 0):
        with pytest.raises(ValueError, match="block_size"):
            cls(1 << 20, block_size)
    for size in (0, -1, (1 << 50) + 1):
        with pytest.raises(ValueError, match="size"):
            cls(size, 4096)


@pytest.mark.parametrize("cls", [DirtyBitmap, ReferenceBitmap])
@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 0), (-1, 10), (0, -5), (1 << 20, 1), ((1 << 20) - 10, 11), (1 << 70, 1), (5, 1 << 64)],
)
def test_bad_ranges_are_refused_with_a_clear_message(cls: type, offset: int, length: int) -> None:
    bitmap = cls(1 << 20, 4096)
    bitmap.mark(0, 4096)
    for method in (bitmap.mark, bitmap.clear, bitmap.test):
        with pytest.raises(ValueError, match=r"offset|range|length"):
            method(offset, length)
    with pytest.raises(ValueError):
        bitmap.mark_many([0, offset], [4096, length])
    assert list(bitmap.extents()) == [(0, 4096)]  # a bad batch marks nothing


def test_mark_many_checks_its_arrays() -> None:
    bitmap = DirtyBitmap(1 << 20, 4096)
    with pytest.raises(ValueError, match="lengths"):
        bitmap.mark_many([0, 4096], [1])
    with pytest.raises(TypeError, match="integers"):
        bitmap.mark_many([0.5], [1])
    bitmap.mark_many([], [])
    bitmap.mark_many(np.array([8192], dtype=np.int32), np.array([1], dtype=np.uint8))
    assert list(bitmap.extents()) == [(8192, 4096)]
    with pytest.raises(ValueError, match="smaller than the block size"):
        list(bitmap.extents(100))


def test_union_needs_the_same_geometry() -> None:
    with pytest.raises(ValueError, match="geometry"):
        DirtyBitmap(1 << 20, 4096).union(DirtyBitmap(1 << 20, 512))
    with pytest.raises(ValueError, match="geometry"):
        DirtyBitmap(1 << 20, 4096).union(DirtyBitmap(2 << 20, 4096))
    with pytest.raises(TypeError):
        DirtyBitmap(1 << 20, 4096).union(ReferenceBitmap(1 << 20, 4096))


# --- files ------------------------------------------------------------------------------------


def marked(cls: type, size: int = 3 * TIB, block_size: int = 4096):
    bitmap = cls(size, block_size)
    for offset, length in [(0, 1), (5 * TIB // 2, 1 << 20), (size - 1, 1), (1 << 30, 12345)]:
        bitmap.mark(offset, length)
    return bitmap


@pytest.mark.parametrize("writer", [DirtyBitmap, ReferenceBitmap])
@pytest.mark.parametrize("reader", [DirtyBitmap, ReferenceBitmap])
def test_save_load_round_trip(tmp_path: Path, writer: type, reader: type) -> None:
    original = marked(writer, size=3 * TIB - 700, block_size=1024)
    path = tmp_path / "dirty.bitmap"
    original.save(path)
    original.save(path)  # replacing an existing file is fine
    loaded = reader.load(path)
    assert (loaded.size, loaded.block_size) == (original.size, original.block_size)
    assert list(loaded.extents()) == list(original.extents())
    assert loaded.count() == original.count()
    assert [p.name for p in tmp_path.iterdir()] == ["dirty.bitmap"]  # no temp file left


def test_empty_bitmap_round_trips(tmp_path: Path) -> None:
    DirtyBitmap(4096, 512).save(tmp_path / "b")
    assert DirtyBitmap.load(tmp_path / "b").count() == 0


def saved(tmp_path: Path) -> bytes:
    marked(DirtyBitmap).save(tmp_path / "b")
    return (tmp_path / "b").read_bytes()


def load_bytes(tmp_path: Path, data: bytes) -> DirtyBitmap:
    (tmp_path / "bad").write_bytes(data)
    return DirtyBitmap.load(tmp_path / "bad")


def test_torn_files_are_refused(tmp_path: Path) -> None:
    data = saved(tmp_path)
    for cut_at in [0, 5, 31, 32, 40, 4000, len(data) // 2, len(data) - 12, len(data) - 1]:
        with pytest.raises(BitmapCorruptError):
            load_bytes(tmp_path, data[:cut_at])
    with pytest.raises(BitmapCorruptError):
        load_bytes(tmp_path, data + b"\0" * 4104)


def test_flipped_bytes_are_refused(tmp_path: Path) -> None:
    data = saved(tmp_path)
    rng = np.random.default_rng(7)
    for pos in [*range(0, 40), *rng.integers(40, len(data), 60).tolist(), len(data) - 1]:
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(BitmapCorruptError):
            load_bytes(tmp_path, bytes(bad))


def resealed(data: bytes, offset: int, value: bytes) -> bytes:
    """The file with bytes replaced and a valid checksum: only the field checks can catch it."""
    body = bytearray(data[:-4])
    body[offset : offset + len(value)] = value
    return bytes(body) + struct.pack("<I", crc32c.crc32c(bytes(body)))


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (0, b"NOTABMP!"),  # magic
        (8, struct.pack("<H", 2)),  # version
        (12, struct.pack("<I", 3000)),  # block size
        (16, struct.pack("<Q", 0)),  # volume size
        (24, struct.pack("<I", 1024)),  # blocks per page
        (32, struct.pack("<Q", 1 << 40)),  # first page index, beyond the volume
    ],
)
@pytest.mark.parametrize("reader", [DirtyBitmap, ReferenceBitmap])
def test_bad_fields_are_refused_even_with_a_valid_checksum(
    tmp_path: Path, offset: int, value: bytes, reader: type
) -> None:
    (tmp_path / "bad").write_bytes(resealed(saved(tmp_path), offset, value))
    with pytest.raises(BitmapCorruptError):
        reader.load(tmp_path / "bad")


def test_bits_past_the_end_of_the_volume_are_refused(tmp_path: Path) -> None:
    bitmap = DirtyBitmap(100 * 4096, 4096)
    bitmap.mark(99 * 4096, 4096)
    bitmap.save(tmp_path / "b")
    data = (tmp_path / "b").read_bytes()
    page = 32 + 8  # header, page index
    bad = resealed(data, page + 100 // 8, bytes([data[page + 100 // 8] | 1 << (100 % 8)]))
    with pytest.raises(BitmapCorruptError, match="beyond the end"):
        load_bytes(tmp_path, bad)


# --- threads ----------------------------------------------------------------------------------


@pytest.fixture
def busy_switching():
    """Switch threads every 0.1 ms instead of every 5 ms: more interleavings."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_marks_and_cuts_lose_nothing() -> None:
    size = TIB
    bitmap = DirtyBitmap(size, 4096)
    nthreads, chunk = 4, 50
    rng = np.random.default_rng(1)
    blocks = np.sort(rng.integers(0, size // 4096, 1_000_000, dtype=np.uint64))
    blocks = blocks[np.diff(blocks, prepend=np.uint64(1 << 63)) != 0]
    rng.shuffle(blocks)  # distinct blocks, more than the threads can mark before they stop
    pools = np.array_split(blocks * 4096, nthreads)
    done = [0] * nthreads  # how many of its pool each thread has marked
    stop = threading.Event()

    def marker(index: int) -> None:
        pool = pools[index]
        while done[index] < len(pool) and not stop.is_set():
            batch = pool[done[index] : done[index] + chunk]
            if index % 2:
                bitmap.mark_many(batch, np.full(len(batch), 4096, dtype=np.uint64))
            else:
                for offset in batch.tolist():
                    bitmap.mark(offset, 4096)
            done[index] += len(batch)

    threads = [threading.Thread(target=marker, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    taken = DirtyBitmap(size, 4096)
    pieces = 0
    started = time.monotonic()
    while any(t.is_alive() for t in threads) and (
        time.monotonic() < started + 1.0 or (pieces < 5 and time.monotonic() < started + 10)
    ):
        piece = bitmap.cut()
        pieces += piece.count() > 0
        taken.union(piece)
        for _ in zip(range(100), bitmap.extents(), strict=False):  # a live walk, for crashes
            pass
    stop.set()
    for t in threads:
        t.join()
    taken.union(bitmap.cut())
    assert pieces > 2  # the cuts really happened while the threads marked
    marked = np.sort(np.concatenate([pool[:n] for pool, n in zip(pools, done, strict=True)]))
    assert taken.count() == len(marked)
    got = np.array([o for o, _ in taken.extents(4096)], dtype=np.uint64)
    assert np.array_equal(got, marked)
