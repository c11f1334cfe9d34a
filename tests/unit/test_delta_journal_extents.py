"""A checked EXTENT frame is staged as one EXTENTS journal record (not a record per run), and its
checked crcs go into the shadow's checksum map as they came: the image, the map and recovery
after a crash must be exactly what a record per run gave."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import zstandard

from shadowblk.delta import applier as applier_module
from shadowblk.delta.applier import ShadowVolume
from shadowblk.delta.extents import Extents, decode_extents, encode_extents
from shadowblk.delta.frames import Frame, FrameType, Hello
from shadowblk.delta.heap import keep_freed_buffers
from shadowblk.delta.journal import BUFFER, Kind, committed_epoch, read_records
from shadowblk.integrity.checksum_map import ChecksumMap
from shadowblk.integrity.crc_scan import checksum_file

SIZE = 16 << 20
BS = 4096


def frame_of(blocks: dict[int, bytes], epoch: int) -> Extents:
    """The checked content of one EXTENT frame holding BLOCKS (block number -> data):
    compressed, or raw when they are random."""
    order = sorted(blocks)
    heads = [i for i, b in enumerate(order) if i == 0 or order[i - 1] != b - 1]
    counts = np.diff([*heads, len(order)])
    offsets = np.array([order[i] * BS for i in heads], dtype=np.uint64)
    payload, flags = encode_extents(
        offsets, counts * BS, [blocks[b] for b in order], BS, zstandard.ZstdCompressor(1)
    )
    frame = Frame(FrameType.EXTENT, 0, 1, epoch, 1, order[0] * BS, len(order) * BS, payload, flags)
    return decode_extents(frame, SIZE, BS, zstandard.ZstdDecompressor())


def scattered(rng: random.Random, count: int, share: float = 0.5) -> dict[int, bytes]:
    """COUNT blocks at random places, some adjacent (runs), a SHARE of them random bytes, the
    others compressible."""
    blocks: dict[int, bytes] = {}
    while len(blocks) < count:
        start = rng.randrange(SIZE // BS - 4)
        for b in range(start, start + rng.choice([1, 1, 1, 3])):
            blocks[b] = os.urandom(BS) if rng.random() < share else bytes([b % 251]) * BS
    return dict(list(blocks.items())[:count])


def expected_image(epochs: list[dict[int, bytes]]) -> bytes:
    image = bytearray(SIZE)
    for blocks in epochs:
        for b, data in blocks.items():
            image[b * BS : (b + 1) * BS] = data
    return bytes(image)


def new_volume(tmp_path: Path) -> ShadowVolume:
    """A volume past its first (direct) epoch, so later epochs go through the journal."""
    volume = ShadowVolume.create(tmp_path, Hello("v", SIZE, BS, 1, 0, b"n" * 16))
    volume.begin_stream()
    volume.stage(Kind.DATA, 0, BS, 1, bytes(BS))
    volume.commit(1)
    return volume


def reopen(tmp_path: Path) -> ShadowVolume:
    return ShadowVolume.load(tmp_path, tmp_path / "v.state")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_frame_is_one_record_and_its_crcs_feed_the_map(tmp_path: Path) -> None:
    rng = random.Random(1)
    volume = new_volume(tmp_path)
    epochs = [scattered(rng, 256), scattered(rng, 200, share=1.0)]  # compressed, then raw
    volume.stage_extents(2, frame_of(epochs[0], 2))
    volume.stage_extents(2, frame_of(epochs[1], 2))
    volume.commit(2)
    kinds = [r.kind for r in read_records(volume.journal.path)]
    assert kinds[-3:] == [Kind.EXTENTS, Kind.EXTENTS, Kind.COMMIT]
    assert volume.image_path.read_bytes() == expected_image(epochs)
    volume.end_stream()  # checkpoint: the map is flushed, stamped with epoch 2
    cmap = volume.checksums.map
    assert cmap is not None and cmap.epoch == 2
    assert np.array_equal(cmap.crcs, checksum_file(volume.image_path, BS))


@pytest.mark.parametrize("held", [True, False])
def test_a_crash_after_the_commit_replays_the_frames_from_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: bool
) -> None:
    """Committed (acknowledged), applied only to the page cache, then a crash: recovery reads
    the EXTENTS records back and leaves exactly the committed epochs; an epoch staged after
    them is dropped. Not HELD: the epoch was too big to keep in memory and the commit itself
    applied it from the journal. Four frames of 1 MiB also spill past the staging buffer."""
    if not held:
        monkeypatch.setattr(applier_module, "HOLD_BYTES", 64 << 10)
    rng = random.Random(2)
    volume = new_volume(tmp_path)
    committed = [scattered(rng, 256) for _ in range(5)]
    assert sum(len(b) for b in committed) * BS > BUFFER
    for blocks in committed:
        volume.stage_extents(2, frame_of(blocks, 2))
    volume.commit(2)
    assert volume.image_path.read_bytes() == expected_image(committed)
    for _ in range(5):  # staged, never committed: more than the buffer, so some is on disk
        volume.stage_extents(3, frame_of(scattered(rng, 256), 3))
    volume.journal.close()  # crash: no checkpoint, no end of stream
    assert 3 in {r.epoch for r in read_records(volume.journal.path)}
    cmap = volume.checksums.map
    assert cmap is not None
    cmap.crcs = np.empty(0, dtype="<u4")  # the crash: the map let go of unflushed, unstamped
    os.close(cmap._fd)
    cmap._fd = -1
    with open(volume.image_path, "r+b") as image:  # the image's page cache was lost with it
        image.write(bytes(SIZE))
    again = reopen(tmp_path)
    assert again.state.last_applied == again.applied == 2
    assert sha(again.image_path.read_bytes()) == sha(expected_image(committed))
    assert committed_epoch(again.journal.path) is None
    assert again.checksums.map is not None and again.checksums.map.epoch == 2
    assert again.checksums.map.rebuilt_reason is not None  # not trusted after the crash
    assert np.array_equal(again.checksums.map.crcs, checksum_file(again.image_path, BS))


def test_put_crcs_matches_computing_them(tmp_path: Path) -> None:
    rng = random.Random(3)
    image = tmp_path / "img"
    image.write_bytes(bytes(SIZE))
    cmap = ChecksumMap.build(image, tmp_path / "map", BS)
    frame = frame_of(scattered(rng, 100), 1)
    cmap.put_crcs(frame.offsets, frame.lengths, frame.crcs())
    with open(image, "r+b") as f:
        view, at = memoryview(frame.data), 0
        for offset, length in zip(frame.offsets, frame.lengths, strict=True):
            f.seek(offset)
            f.write(view[at : at + length])
            at += length
    assert np.array_equal(cmap.crcs, checksum_file(image, BS))
    for offsets, lengths, n in [
        ([1], [BS], 1),
        ([0], [BS + 1], 1),
        ([SIZE], [BS], 1),
        ([0], [BS], 2),
    ]:
        with pytest.raises(ValueError):
            cmap.put_crcs(offsets, lengths, np.zeros(n, dtype=np.uint32))
    cmap.close()


def test_freed_buffers_are_kept_for_reuse() -> None:
    assert keep_freed_buffers()  # glibc here: a shadow reuses its frames' pages
