"""An epoch's capture against the obvious model: replaying its frames onto the old content
gives exactly what applying the writes one by one gives."""

from __future__ import annotations

import random

import pytest
import zstandard

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
    epoch = Epoch()
    for _ in range(rng.randint(1, 40)):
        start = rng.randrange(NBLOCKS)
        end = rng.randint(start + 1, min(NBLOCKS, start + 12))
        if rng.random() < 0.3:  # a run of whole blocks in one call, as on_write captures it
            data = rng.randbytes((end - start) * BS)
            epoch.put_run(start, memoryview(data), BS)
            model[start * BS : end * BS] = data
        elif rng.random() < 0.6:
            for block in range(start, end):
                data = bytes(BS) if rng.random() < 0.2 else rng.randbytes(BS)
                epoch.put(block, data)
                model[block * BS : (block + 1) * BS] = data
        else:
            epoch.mark(start, end, rng.choice([Mark.ZERO, Mark.TRIM]))
            model[start * BS : end * BS] = bytes((end - start) * BS)
    assert epoch.nbytes == len(epoch.blocks) * BS
    replica = bytearray(base)
    covered: set[int] = set()
    dctx = zstandard.ZstdDecompressor()
    for change in epoch.changes(BS, zstandard.ZstdCompressor()):
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
    assert covered == set(epoch.blocks) | {b for s, e, _ in epoch.marks for b in range(s, e)}
    for block in range(NBLOCKS):
        assert (epoch.mark_at(block) is not None) == any(s <= block < e for s, e, _ in epoch.marks)


def test_discarding_a_huge_range_is_one_entry() -> None:
    epoch = Epoch()
    epoch.put(5, b"x" * BS)
    epoch.mark(0, 1 << 40, Mark.TRIM)
    epoch.put(7, b"y" * BS)
    assert epoch.blocks.keys() == {7}
    assert epoch.marks == [(0, 7, Mark.TRIM), (8, 1 << 40, Mark.TRIM)]
