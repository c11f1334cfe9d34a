"""An epoch's capture against the obvious model: replaying its frames onto the old content
gives exactly what applying the writes one by one gives."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
import zstandard
from shadowblk._native.blockcrc import block_crc32c

from shadowblk._native import framepack
from shadowblk.delta.epoch import Epoch, Mark
from shadowblk.delta.extents import decode_extents
from shadowblk.delta.frames import Frame, FrameType

BS = 512
NBLOCKS = 64


@pytest.mark.parametrize("seed", range(30))
def test_frames_replay_the_writes_in_order(seed: int) -> None:
    rng = random.Random(seed)
    base = bytearray(rng.randbytes(BS * NBLOCKS))
    model = bytearray(base)
    epoch = Epoch(BS)
    for _ in range(rng.randint(1, 40)):
        start = rng.randrange(NBLOCKS)
        end = rng.randint(start + 1, min(NBLOCKS, start + 12))
        if rng.random() < 0.3:  # a run of whole blocks in one call, as on_write captures it
            data = rng.randbytes((end - start) * BS)
            epoch.put_run(start, memoryview(data))
            model[start * BS : end * BS] = data
        elif rng.random() < 0.6:
            for block in range(start, end):
                data = bytes(BS) if rng.random() < 0.2 else rng.randbytes(BS)
                epoch.put(block, data)
                model[block * BS : (block + 1) * BS] = data
        else:
            epoch.mark(start, end, rng.choice([Mark.ZERO, Mark.TRIM]))
            model[start * BS : end * BS] = bytes((end - start) * BS)
    held = {b for s, e, _ in epoch.pieces() for b in range(s, e)}
    assert epoch.nbytes == len(held) * BS == sum(len(d) for _, _, d in epoch.pieces())
    replica = bytearray(base)
    covered: set[int] = set()
    dctx = zstandard.ZstdDecompressor()
    for change in epoch.changes(1):
        if change.type is FrameType.EXTENT:
            frame = Frame(change.type, offset=change.offset, length=change.length,
                          payload=change.payload, flags=change.flags)  # fmt: skip
            got = decode_extents(frame, len(base), BS, dctx)
            pieces = list(zip(got.offsets, got.lengths, strict=True))
            view, at = memoryview(got.data), 0
        else:
            pieces, view, at = [(change.offset, change.length)], memoryview(bytes(change.length)), 0
        for offset, length in pieces:
            blocks = range(offset // BS, (offset + length) // BS)
            assert covered.isdisjoint(blocks), "changes of one epoch must not overlap"
            covered.update(blocks)
            replica[offset : offset + length] = view[at : at + length]
            at += length
    assert replica == model
    assert covered == held | {b for s, e, _ in epoch.marks for b in range(s, e)}
    for block in range(NBLOCKS):
        assert (epoch.mark_at(block) is not None) == any(s <= block < e for s, e, _ in epoch.marks)


def test_discarding_a_huge_range_is_one_entry() -> None:
    epoch = Epoch(BS)
    epoch.put(5, b"x" * BS)
    epoch.mark(0, 1 << 40, Mark.TRIM)
    epoch.put(7, b"y" * BS)
    assert epoch.ranges()[0] == (7, 8) and epoch.nbytes == BS
    assert epoch.marks == [(0, 7, Mark.TRIM), (8, 1 << 40, Mark.TRIM)]


def replay(epoch: Epoch, size: int) -> tuple[bytearray, list[int]]:
    """The epoch's frames applied to a zeroed volume of SIZE bytes, and every block they carry
    data or a range for, as often as they carry it."""
    image, carried = bytearray(size), []
    dctx = zstandard.ZstdDecompressor()
    for change in epoch.changes(1):
        if change.type is FrameType.EXTENT:
            frame = Frame(change.type, offset=change.offset, length=change.length,
                          payload=change.payload, flags=change.flags)  # fmt: skip
            got = decode_extents(frame, size, epoch.block_size, dctx)
            at = 0
            for offset, length in zip(got.offsets, got.lengths, strict=True):
                image[offset : offset + length] = memoryview(got.data)[at : at + length]
                at += length
                carried += range(offset // epoch.block_size, (offset + length) // epoch.block_size)
        else:
            image[change.offset : change.offset + change.length] = bytes(change.length)
            bs = epoch.block_size
            carried += range(change.offset // bs, (change.offset + change.length) // bs)
    return image, carried


def test_a_block_rewritten_in_an_epoch_travels_once() -> None:
    epoch = Epoch(BS)
    a, b, c = (bytes([v]) * BS for v in (1, 2, 3))
    epoch.put_run(0, a * 8)  # blocks 0-7
    epoch.put_run(4, b * 8)  # 4-11 over the first run's tail
    epoch.put(6, c)  # one block inside the second run
    epoch.put_run(10, a * 2)  # 10-11, the second run's tail again
    assert epoch.nbytes == 12 * BS
    image, carried = replay(epoch, 16 * BS)
    assert sorted(carried) == list(range(12))  # every block once
    assert image[: 12 * BS] == a * 4 + b * 2 + c + b * 3 + a * 2


def test_marks_cut_runs_and_runs_cut_marks() -> None:
    epoch = Epoch(BS)
    data = bytes(range(256)) * (16 * BS // 256)
    epoch.put_run(0, data)  # blocks 0-15
    epoch.mark(4, 8, Mark.TRIM)
    assert [(s, e) for s, e, _ in epoch.pieces()] == [(0, 4), (8, 16)]
    assert epoch.nbytes == 12 * BS and epoch.block_at(5) is None and epoch.mark_at(5) is Mark.TRIM
    epoch.put_run(6, b"\x07" * 4 * BS)  # blocks 6-9: over the mark's tail and the run's head
    epoch.mark(15, 20, Mark.ZERO)
    assert epoch.marks == [(4, 6, Mark.TRIM), (15, 20, Mark.ZERO)]
    assert [(s, e) for s, e, _ in epoch.pieces()] == [(0, 4), (6, 10), (10, 15)]
    image, carried = replay(epoch, 32 * BS)
    assert sorted(carried) == list(range(20))
    assert image[: 4 * BS] == data[: 4 * BS]
    assert image[4 * BS : 6 * BS] == bytes(2 * BS)
    assert image[6 * BS : 10 * BS] == b"\x07" * 4 * BS
    assert image[10 * BS : 15 * BS] == data[10 * BS : 15 * BS]


def test_a_run_longer_than_a_frame_spans_frames() -> None:
    """A 2.5 MiB write: one run, three frames of at most MAX_EXTENT bytes."""
    epoch = Epoch(4096)
    data = random.Random(2).randbytes(640 * 4096)
    epoch.put_run(100, memoryview(data))
    changes = list(epoch.changes(1))
    assert [c.length for c in changes] == [1 << 20, 1 << 20, 128 * 4096]
    image, carried = replay(epoch, 1024 * 4096)
    assert sorted(carried) == list(range(100, 740))
    assert image[100 * 4096 : 740 * 4096] == data


@pytest.mark.parametrize("blocks", [4, 640], ids=["one frame", "on the threads"])
def test_a_frame_that_fails_to_build_is_built_again(
    blocks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed build must not leave the epoch with its marks only: the next call would ship
    it without its data (the shadow would commit an epoch missing its writes)."""
    import shadowblk.delta.epoch as epoch_module

    epoch = Epoch(4096)
    data = random.Random(3).randbytes(blocks * 4096)
    epoch.put_run(0, data)
    epoch.mark(blocks + 10, blocks + 20, Mark.TRIM)
    real, calls = epoch_module.piece_changes, []

    def fail_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("transient")
        return real(*args)

    monkeypatch.setattr(epoch_module, "piece_changes", fail_once)
    with pytest.raises(MemoryError):
        list(epoch.changes(1))
    again = list(epoch.changes(1))
    assert [c.type for c in again].count(FrameType.TRIM) == 1
    assert sum(c.length for c in again if c.type is FrameType.EXTENT) == blocks * 4096
    image, _ = replay(epoch, (blocks + 32) * 4096)
    assert image[: blocks * 4096] == data


def test_what_a_trimmed_run_keeps_does_not_pin_its_whole_write() -> None:
    """A small remnant of a big write is copied, so the big buffer can go."""
    epoch = Epoch(BS)
    epoch.put_run(0, b"\x01" * 64 * BS)
    epoch.put_run(0, b"\x02" * 63 * BS)
    remnant = epoch.pieces()[-1]
    assert remnant[:2] == (63, 64) and isinstance(remnant[2], bytes)
    epoch.put_run(40, b"\x03" * 2 * BS)  # most of a run stays: a view is enough
    assert isinstance(epoch.pieces()[0][2], memoryview)
    assert epoch.nbytes == 64 * BS


def test_a_write_is_captured_as_it_was_when_written() -> None:
    """The client's buffer, reused after the write, does not change the epoch (I1)."""
    epoch = Epoch(BS)
    buf = bytearray(b"\x05" * 3 * BS)
    epoch.put_run(2, memoryview(buf))
    epoch.put_run(9, memoryview(buf)[:BS])
    buf[:] = b"\x06" * 3 * BS
    assert epoch.block_at(3) == b"\x05" * BS and epoch.block_at(9) == b"\x05" * BS


def test_pack_frame_finds_zero_blocks_merges_extents_and_checksums() -> None:
    """One native pass: zero blocks across pieces (a block zero up to its last byte is data),
    adjacent data blocks merged into one extent whatever piece they come from, a crc per data
    block, and the data copied behind the head."""
    late = bytearray(BS)
    late[-1] = 1
    a, b = rng_bytes(1, BS), rng_bytes(2, 2 * BS)
    pieces = [
        (3, 5, bytes(2 * BS)),  # zeros 3-4
        (5, 7, memoryview(bytes(late) + bytes(BS))),  # data 5, zero 6
        (7, 8, a),  # data 7
        (8, 10, memoryview(b"\xff" * BS + b)[BS:]),  # data 8-9, merged with 7
        (12, 13, bytes(BS)),  # zero 12, not merged with 6
    ]
    payload, head_len, offset, length, zeros = framepack.pack_frame(pieces, BS)
    assert zeros == [(3 * BS, 2 * BS), (6 * BS, BS), (12 * BS, BS)]
    assert (offset, length) == (5 * BS, 4 * BS)
    data = bytes(late) + a + b
    assert payload[head_len:] == data
    (count,) = struct.unpack_from("!I", payload)
    entries = [struct.unpack_from("!QI", payload, 4 + 12 * i) for i in range(count)]
    assert entries == [(5 * BS, BS), (7 * BS, 3 * BS)]
    crcs = np.frombuffer(payload, ">u4", 4, 4 + 12 * count)
    assert crcs.tolist() == block_crc32c(data, BS).tolist()
    assert framepack.pack_frame([(0, 2, bytes(2 * BS))], BS)[0] is None
    with pytest.raises(ValueError, match="not whole blocks"):
        framepack.pack_frame([(0, 1, bytes(BS + 1))], BS)
    with pytest.raises(ValueError, match="not whole blocks"):
        framepack.pack_frame([(0, 2, bytes(BS))], BS)


def rng_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)
