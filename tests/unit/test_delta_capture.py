"""The replicator's capture of writes, alone or in batches, against the obvious model: the
open epoch holds, per block written, the volume's content after the writes in their order."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from shadowblk.delta.epoch import Epoch
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
