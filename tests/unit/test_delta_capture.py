"""The replicator's capture of writes, alone or in batches, against the obvious model: the
open epoch holds, per block written, the volume's content after the writes in their order."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

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
        for rep in reps:
            assert rep.open.blocks, "nothing captured"
            for block, data in rep.open.blocks.items():
                assert data == model[block * BS : (block + 1) * BS], block
            assert rep.open.nbytes == len(rep.open.blocks) * BS
        assert reps[0].open.blocks.keys() == reps[1].open.blocks.keys()
    finally:
        for rep in reps:
            rep.close()
        os.close(fd)
