"""The replicator's capture of writes, alone or in batches, against the obvious model: the
open epoch holds, per block written, the volume's content after the writes in their order."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import zstandard

from shadowblk.delta.epoch import Epoch
from shadowblk.delta.extents import decode_extents
from shadowblk.delta.frames import Frame, FrameType
from shadowblk.delta.primary_state import CHUNK
from shadowblk.delta.replicator import Replicator

BS = 4096
SIZE = 64 * BS


@pytest.mark.parametrize("seed", range(10))
def test_batches_capture_what_single_writes_capture(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    volume = tmp_path / "v.img"
    volume.write_bytes(rng.randbytes(SIZE))
    model = bytearray(volume.read_bytes())
    fd = os.open(volume, os.O_RDONLY)
    reps = [
        Replicator(f"v{i}", fd, SIZE, [], tmp_path / f"state{i}", hmac_key=b"k" * 16)
        for i in range(2)
    ]
    try:
        batch = []
        for _ in range(rng.randint(1, 30)):
            offset = rng.randrange(SIZE - 1)
            data = rng.randbytes(rng.randint(1, min(3 * BS, SIZE - offset)))
            batch.append((offset, data))
            model[offset : offset + len(data)] = data
            reps[0].on_write(offset, data)  # the volume itself is never written: a batch
        reps[1].on_writes(batch)  # comes before any of its writes reaches the volume
        captured = [held(rep.open) for rep in reps]
        for blocks, rep in zip(captured, reps, strict=True):
            assert blocks, "nothing captured"
            for block, data in blocks.items():
                assert data == model[block * BS : (block + 1) * BS], block
            assert rep.open.nbytes == len(blocks) * BS
        assert captured[0].keys() == captured[1].keys()
    finally:
        for rep in reps:
            rep.close()
        os.close(fd)


def held(epoch: Epoch) -> dict[int, bytes]:
    """Block number -> data of every block the epoch's runs hold."""
    return {
        block: epoch.block_at(block)
        for start, end, _ in epoch.pieces()
        for block in range(start, end)
    }


@pytest.mark.parametrize("seed", range(10))
def test_captured_batches_travel_once_and_mark_the_lacks(tmp_path: Path, seed: int) -> None:
    """Batches as the native loop gives them (whole blocks as bytes, kept as they are) mixed
    with reused client buffers, partial and multi-block writes, ZERO and TRIM over captured
    data: the cut epoch's frames replay to the model, each block once, and the shadow's lacks
    and activity log hold every block and chunk written (a shadow link, never started)."""
    rng = random.Random(seed)
    volume = tmp_path / "v.img"
    volume.write_bytes(rng.randbytes(SIZE))
    model = bytearray(volume.read_bytes())
    fd = os.open(volume, os.O_RDONLY)
    rep = Replicator("v", fd, SIZE, ["127.0.0.1:1"], tmp_path / "state", hmac_key=b"k" * 16)
    reused = bytearray(BS)
    written: set[int] = set()
    try:
        for _ in range(rng.randint(5, 40)):
            offset = rng.randrange(SIZE // BS) * BS
            kind = rng.random()
            if kind < 0.15:
                length = rng.randint(1, 6) * BS
                length = min(length, SIZE - offset)
                (rep.on_zero if rng.random() < 0.5 else rep.on_trim)(offset, length)
                model[offset : offset + length] = bytes(length)
                written.update(range(offset // BS, (offset + length) // BS))
                continue
            batch: list[tuple[int, bytes | bytearray]] = []
            for _ in range(rng.randint(1, 8)):
                offset = rng.randrange(SIZE // BS) * BS
                pick = rng.random()
                if pick < 0.5:
                    data = rng.choice([bytes(BS), rng.randbytes(BS)])  # the loop's own bytes
                elif pick < 0.7 and all(d is not reused for _, d in batch):
                    reused[:] = rng.randbytes(BS)  # a client buffer, refilled after the call
                    data = reused
                elif pick < 0.85:
                    offset += rng.randrange(BS)
                    data = rng.randbytes(rng.randint(1, min(2 * BS, SIZE - offset)))
                else:
                    data = rng.randbytes(min(rng.randint(2, 5) * BS, SIZE - offset))
                batch.append((offset, data))
                model[offset : offset + len(data)] = data
                written.update(range(offset // BS, (offset + len(data) - 1) // BS + 1))
            rep.on_writes(batch)
            reused[:] = b"\xee" * BS  # the buffer reused once the write is acknowledged
        epoch = rep.open
        rep.cut_epoch()
        replica = bytearray(volume.read_bytes())
        covered = apply_frames(epoch, replica)
        assert replica == model
        assert covered == written
        rec = rep.links[0].record
        assert all(rec.lacks.test(block * BS) for block in written)
        assert {block * BS // CHUNK for block in written} <= rec.log.hot <= rec.covered
    finally:
        rep.close()
        os.close(fd)


def apply_frames(epoch: Epoch, replica: bytearray) -> set[int]:
    """Write the epoch's frames onto REPLICA; the blocks they cover (asserted disjoint)."""
    covered: set[int] = set()
    dctx = zstandard.ZstdDecompressor()
    for change in epoch.changes(1):
        if change.type is FrameType.EXTENT:
            frame = Frame(change.type, offset=change.offset, length=change.length,
                          payload=change.payload, flags=change.flags)  # fmt: skip
            got = decode_extents(frame, len(replica), BS, dctx)
            ranges, data = list(zip(got.offsets, got.lengths, strict=True)), bytes(got.data)
        else:
            ranges, data = [(change.offset, change.length)], bytes(change.length)
        at = 0
        for offset, length in ranges:
            blocks = range(offset // BS, (offset + length) // BS)
            assert covered.isdisjoint(blocks), "a block travels once per epoch"
            covered.update(blocks)
            replica[offset : offset + length] = data[at : at + length]
            at += length
    return covered
