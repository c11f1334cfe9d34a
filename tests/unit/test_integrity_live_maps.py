"""Checksum maps kept by live servers: zero ranges, checkpoints that keep writing, reading a
map a writer holds open, and the shadow's AppliedMap."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from shadowblk.delta.journal import Kind
from shadowblk.integrity.applied_map import AppliedMap
from shadowblk.integrity.checksum_map import (
    ChecksumMap,
    LiveMap,
    MapBusyError,
    MapInvalidError,
    zero_block_crc,
)

BS = 4096


def _image(tmp_path: Path, size: int) -> tuple[Path, bytearray]:
    data = bytearray(random.Random(size).randbytes(size))
    path = tmp_path / "img"
    path.write_bytes(data)
    return path, data


def test_zero_block_crc_is_the_documented_constant() -> None:
    assert zero_block_crc(4096) == 0x98F94189


@pytest.mark.parametrize("size", [16 * BS, 16 * BS + 1000])
@pytest.mark.parametrize(
    ("offset", "length"), [(0, 3 * BS), (100, 50), (1000, 5 * BS), (2 * BS + 7, 3 * BS - 7)]
)
def test_update_zero_matches_a_rebuild(tmp_path: Path, size: int, offset: int, length: int) -> None:
    path, data = _image(tmp_path, size)
    cmap = ChecksumMap.build(path, tmp_path / "map")
    for off, n in [(offset, length), (size - BS // 2, BS // 2), (10 * BS, size - 10 * BS)]:
        data[off : off + n] = bytes(n)
        cmap.update_zero(off, n, read=lambda o, n: bytes(data[o : o + n]))
    path.write_bytes(data)
    with ChecksumMap.build(path, tmp_path / "fresh") as fresh:
        assert (cmap.crcs == fresh.crcs).all()
    cmap.close()


def test_a_change_after_a_checkpoint_makes_the_map_untrusted_again(tmp_path: Path) -> None:
    path, _ = _image(tmp_path, 8 * BS)
    cmap = ChecksumMap.build(path, tmp_path / "map")
    cmap.update(0, os.urandom(BS))
    cmap.flush()  # a checkpoint: clean on disk
    assert LiveMap(tmp_path / "map").clean
    cmap.update(BS, os.urandom(BS))  # the writer goes on: not clean on disk any more
    assert not LiveMap(tmp_path / "map").clean
    os.close(cmap._fd)  # the writer dies here (no close, no flush)
    with pytest.raises(MapInvalidError, match="not closed cleanly"):
        ChecksumMap.load(tmp_path / "map")


def test_live_map_reads_what_a_writer_holds_open(tmp_path: Path) -> None:
    path, _ = _image(tmp_path, 8 * BS)
    with ChecksumMap.build(path, tmp_path / "map") as cmap:
        with pytest.raises(MapBusyError):
            ChecksumMap.load(tmp_path / "map")
        cmap.update(3 * BS, bytes(BS))
        live = LiveMap(tmp_path / "map")
        assert live.crcs[3] == zero_block_crc(BS) and (live.crcs == cmap.crcs).all()
        assert (live.size, live.block_size, live.blocks) == (8 * BS, BS, 8)


def test_applied_map_follows_epochs_and_rebuilds_a_leftover(tmp_path: Path) -> None:
    path, data = _image(tmp_path, 8 * BS)
    ChecksumMap.build(path, tmp_path / "v.map", epoch=9).close()  # of an earlier volume
    applied = 0
    amap = AppliedMap(tmp_path / "v.map", path, BS, lambda: applied)
    block = os.urandom(BS)
    with open(path, "r+b") as f:
        f.seek(2 * BS)
        f.write(block)
        f.seek(5 * BS)
        f.write(bytes(2 * BS))
    data[2 * BS : 3 * BS] = block
    data[5 * BS : 7 * BS] = bytes(2 * BS)
    amap.applied(Kind.DATA, 2 * BS, BS, block)
    amap.applied(Kind.TRIM, 5 * BS, 2 * BS, b"")
    assert amap.map is not None and amap.map.epoch == 0  # rebuilt, at the volume's epoch
    amap.committed(1)
    saved = LiveMap(tmp_path / "v.map")
    assert saved.clean and saved.epoch == 1
    with ChecksumMap.build(path, tmp_path / "fresh") as fresh:
        assert (saved.crcs == fresh.crcs).all()
