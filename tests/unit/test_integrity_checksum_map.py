"""Checksum maps on real files: built from the data, updated on writes, persisted, and never
trusted when missing, truncated, corrupt, uncleanly closed or of another geometry."""

import logging
import os
import shutil
from pathlib import Path

import crc32c
import numpy as np
import pytest

from shadowblk.integrity.checksum_map import (
    HEADER_BYTES,
    ChecksumMap,
    MapBusyError,
    MapInvalidError,
)

BS = 4096


def brute_crcs(data: bytes, bs: int = BS) -> list[int]:
    """crc32c of each block, the last one zero-padded: the definition, one block at a time."""
    return [crc32c.crc32c(data[i : i + bs].ljust(bs, b"\0")) for i in range(0, len(data), bs)]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "vol.img"
    path.write_bytes(np.random.default_rng(7).bytes(3 * (1 << 20) + 1000))  # odd size
    return path


def test_build_matches_block_by_block_crc32c(image: Path, tmp_path: Path) -> None:
    with ChecksumMap.build(image, tmp_path / "vol.map", BS, epoch=9) as cmap:
        assert cmap.crcs.tolist() == brute_crcs(image.read_bytes())
        assert (cmap.size, cmap.block_size, cmap.epoch) == (image.stat().st_size, BS, 9)


def test_zero_blocks_share_one_crc(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.img"
    with sparse.open("wb") as f:
        f.truncate(1 << 20)
    with ChecksumMap.build(sparse, tmp_path / "sparse.map") as cmap:
        assert set(cmap.crcs.tolist()) == {crc32c.crc32c(bytes(BS))}


def test_saved_map_loads_back(image: Path, tmp_path: Path) -> None:
    path = tmp_path / "vol.map"
    with ChecksumMap.build(image, path) as cmap:
        cmap.crcs[5] = 12345
        cmap.set_epoch(42)
        expected = cmap.crcs.copy()
    with ChecksumMap.load(path) as again:
        assert np.array_equal(again.crcs, expected)
        assert again.epoch == 42
        with pytest.raises(PermissionError):
            again.update(0, bytes(BS))


def test_updates_follow_writes_to_the_file(image: Path, tmp_path: Path) -> None:
    """Random writes, aligned and not, applied to the file and to its map: the map stays equal
    to a fresh build of the file."""
    rng = np.random.default_rng(1)
    size = image.stat().st_size
    with ChecksumMap.build(image, tmp_path / "vol.map") as cmap, image.open("r+b") as f:

        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        for _ in range(200):
            length = int(rng.integers(1, 3 * BS))
            offset = int(rng.integers(0, size - length))
            if rng.random() < 0.3:
                offset -= offset % BS
                length = min(BS * (1 + length // BS), size - offset)
            data = rng.bytes(length)
            f.seek(offset)
            f.write(data)
            f.flush()
            cmap.update(offset, data, read=read)
        tail = size - size % BS
        data = rng.bytes(size - tail)
        f.seek(tail)
        f.write(data)
        f.flush()
        cmap.update(tail, data)  # block-aligned start, ends at the volume's odd end
        assert cmap.crcs.tolist() == brute_crcs(image.read_bytes())


def test_unaligned_update_without_reader_is_refused(image: Path, tmp_path: Path) -> None:
    with ChecksumMap.build(image, tmp_path / "vol.map") as cmap:
        with pytest.raises(ValueError, match="not block-aligned"):
            cmap.update(100, b"x" * 10)
        with pytest.raises(ValueError, match="outside the volume"):
            cmap.update(cmap.size - BS + 1, bytes(BS))


def _assert_rebuilt(path: Path, image: Path, caplog: pytest.LogCaptureFixture, reason: str) -> None:
    with caplog.at_level(logging.WARNING), ChecksumMap.open_or_rebuild(path, image, BS) as cmap:
        assert reason in (cmap.rebuilt_reason or "")
        assert cmap.crcs.tolist() == brute_crcs(image.read_bytes())
    assert any("rebuilding it from the data" in r.message for r in caplog.records)
    with ChecksumMap.load(path) as saved:  # the rebuilt map was saved, valid
        assert saved.crcs.tolist() == brute_crcs(image.read_bytes())


def test_missing_map_is_rebuilt_with_a_warning(image: Path, tmp_path: Path, caplog) -> None:
    _assert_rebuilt(tmp_path / "none.map", image, caplog, "missing")


@pytest.mark.parametrize("cut", [4, HEADER_BYTES + 10, 30])
def test_truncated_map_is_rebuilt_with_a_warning(
    image: Path, tmp_path: Path, caplog, cut: int
) -> None:
    path = tmp_path / "vol.map"
    ChecksumMap.build(image, path).close()
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - cut if cut > 30 else cut)
    with pytest.raises(MapInvalidError, match=r"truncated|too short"):
        ChecksumMap.load(path)
    _assert_rebuilt(path, image, caplog, "")


@pytest.mark.parametrize(
    ("where", "message"), [(HEADER_BYTES + 4 * 100 + 2, "entries"), (30, "header checksum")]
)
def test_corrupt_map_is_rebuilt_not_trusted(
    image: Path, tmp_path: Path, caplog, where: int, message: str
) -> None:
    path = tmp_path / "vol.map"
    ChecksumMap.build(image, path).close()
    with path.open("r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x10]))
    _assert_rebuilt(path, image, caplog, message)


def test_map_left_open_by_a_writer_is_not_trusted(image: Path, tmp_path: Path, caplog) -> None:
    """A writer that dies between a data write and its map update leaves the clean flag off."""
    path = tmp_path / "vol.map"
    ChecksumMap.build(image, path).close()
    with ChecksumMap.load(path, writable=True):
        shutil.copy(path, tmp_path / "crashed.map")  # what a crash right now leaves on disk
    with pytest.raises(MapInvalidError, match="not closed cleanly"):
        ChecksumMap.load(tmp_path / "crashed.map")
    _assert_rebuilt(tmp_path / "crashed.map", image, caplog, "not closed cleanly")


def test_map_of_another_geometry_is_rebuilt(image: Path, tmp_path: Path, caplog) -> None:
    path = tmp_path / "vol.map"
    ChecksumMap.build(image, path).close()
    with image.open("ab") as f:
        f.write(os.urandom(BS))
    _assert_rebuilt(path, image, caplog, "does not match")


def test_block_size_defaults_to_the_saved_maps(image: Path, tmp_path: Path, caplog) -> None:
    path = tmp_path / "vol.map"
    ChecksumMap.build(image, path, block_size=8192).close()
    with ChecksumMap.open_or_rebuild(path, image) as cmap:
        assert (cmap.block_size, cmap.rebuilt_reason) == (8192, None)
    _assert_rebuilt(path, image, caplog, "does not match")  # asked for 4096: another geometry


def test_a_map_open_for_writing_is_neither_shared_nor_rebuilt(image: Path, tmp_path: Path) -> None:
    path = tmp_path / "vol.map"
    ChecksumMap.build(image, path).close()
    with ChecksumMap.load(path, writable=True) as writer:
        inode = path.stat().st_ino
        with pytest.raises(MapBusyError):
            ChecksumMap.load(path, writable=True)
        with pytest.raises(MapBusyError):
            ChecksumMap.open_or_rebuild(path, image, BS)  # unclean on disk, yet not rebuilt
        assert path.stat().st_ino == inode
        writer.crcs[0] ^= 1
    with ChecksumMap.load(path) as reader, ChecksumMap.load(path) as second_reader:
        assert reader.crcs[0] == second_reader.crcs[0] != brute_crcs(image.read_bytes())[0]


def test_a_flush_syncs_once_and_a_close_after_it_not_at_all(
    image: Path, tmp_path: Path, monkeypatch
) -> None:
    """One fsync stamps the entries and the clean header; a flush or close that finds nothing
    changed (a shadow's hand-over right after its checkpoint) writes nothing; entries changed
    behind the map's back (a repair's own mapping) are seen by their crc and stamped."""
    path = tmp_path / "vol.map"
    ChecksumMap.build(image, path, BS).close()
    syncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd))[1])
    cmap = ChecksumMap.load(path, writable=True)  # its header says not clean: one sync
    cmap.update(0, b"x" * BS)
    cmap.set_epoch(5)
    syncs.clear()
    cmap.flush()
    assert len(syncs) == 1
    cmap.flush()
    assert len(syncs) == 1  # nothing changed
    other = np.memmap(path, dtype="<u4", mode="r+", offset=HEADER_BYTES, shape=(cmap.blocks,))
    other[3] = 1234  # written the way a switchover's repair writes entries
    other.flush()
    del other
    cmap.close()
    assert len(syncs) == 2  # the changed entries' crc stamped
    monkeypatch.setattr(os, "fsync", real_fsync)
    with ChecksumMap.load(path) as again:  # trusted: the header's crc covers those entries
        assert (again.epoch, int(again.crcs[3])) == (5, 1234)
        assert int(again.crcs[0]) == crc32c.crc32c(b"x" * BS)
