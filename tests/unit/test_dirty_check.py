"""The agent's side of the checksum compare before a promotion: which blocks count as dirtied
since the last verify, the shadow's data crcs (not its map's), and the repair of its blocks."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pytest

from shadowblk.agent import dirty_check
from shadowblk.integrity.blockcrc import block_crc32c
from shadowblk.integrity.checksum_map import ChecksumMap, LiveMap

BS = 4096
BLOCKS = 64


def write(image: Path, block: int, byte: int) -> None:
    with open(image, "r+b") as f:
        f.seek(block * BS)
        f.write(bytes([byte]) * BS)


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, Path]:
    """An old primary's data folder and a shadow's, with the same blocks 3 and 9 written."""
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "primaries" / "v.state").mkdir(parents=True)
    (new / "shadows").mkdir(parents=True)
    image = old / "primaries" / "v.img"
    image.write_bytes(bytes(BLOCKS * BS))
    for block in (3, 9):
        write(image, block, 0x33)
    ChecksumMap.build(image, old / "primaries" / "v.state" / "checksums.map").close()
    shutil.copy(image, new / "shadows" / "v.img")
    ChecksumMap.build(new / "shadows" / "v.img", new / "shadows" / "v.map").close()
    return old, new


def compare(old: Path, new: Path, before: int, after: int) -> tuple[list[int], bool, str]:
    dirty = dirty_check.primary_dirty(old, "v", before)
    blocks = dirty_check.unpack_blocks(dirty["blocks"], dirty["total"])
    got = dirty_check.shadow_crcs(new, "v", {"blocks": dirty["blocks"], "generation": after})
    same = np.array_equal(dirty_check.unpack(dirty["crcs"]), dirty_check.unpack(got["crcs"]))
    return blocks.tolist(), same, dirty["scope"]


def test_never_verified_compares_every_written_block(copies: tuple[Path, Path]) -> None:
    old, new = copies
    assert compare(old, new, before=1, after=2) == ([3, 9], True, "since-created")


def test_a_verified_copy_compares_only_what_was_written_since(copies: tuple[Path, Path]) -> None:
    old, new = copies
    compare(old, new, before=1, after=2)  # `new` verified, at generation 2
    # `new` becomes the primary (its map is the primary's) and block 20 is written there
    state = new / "primaries" / "v.state"
    state.mkdir(parents=True)
    shutil.move(new / "shadows" / "v.img", new / "primaries" / "v.img")
    write(new / "primaries" / "v.img", 20, 0x44)
    ChecksumMap.build(new / "primaries" / "v.img", state / "checksums.map").close()
    assert dirty_check.primary_dirty(new, "v", 2)["count"] == 1  # block 20 only
    assert dirty_check.primary_dirty(new, "v", 3)["count"] == 3  # another generation: all


def test_the_shadows_data_is_compared_not_its_map(copies: tuple[Path, Path]) -> None:
    old, new = copies
    with open(new / "shadows" / "v.img", "r+b") as f:  # rot: the map keeps the right crc
        f.seek(9 * BS + 5)
        f.write(b"\xff")
    blocks, same, _ = compare(old, new, before=1, after=2)
    assert blocks == [3, 9] and not same

    truth = dirty_check.read_blocks(old, "v", [9])
    assert dirty_check.unpack(truth["crcs"]).tolist() == block_crc32c(bytes([0x33]) * BS).tolist()
    assert dirty_check.repair(new, "v", {"blocks": [9], "data": truth["data"]}) == {"repaired": 1}
    assert compare(old, new, before=1, after=2)[1]
    assert LiveMap(new / "shadows" / "v.map").crcs[9] == block_crc32c(bytes([0x33]) * BS)[0]


def test_bad_input_is_refused(copies: tuple[Path, Path]) -> None:
    old, new = copies
    with pytest.raises(dirty_check.CheckError):
        dirty_check.shadow_crcs(new, "v", {"blocks": "not a bitmap"})
    with pytest.raises(dirty_check.CheckError):
        dirty_check.read_blocks(old, "v", [BLOCKS])
    with pytest.raises(dirty_check.CheckError):
        dirty_check.repair(new, "v", {"blocks": [1], "data": ""})
    with pytest.raises(dirty_check.CheckError):
        dirty_check.primary_dirty(new, "v", 1)  # no primary here


def test_data_crcs_of_long_and_broken_runs(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    data = np.random.default_rng(7).integers(0, 256, 3000 * BS, dtype=np.uint8).tobytes()
    image.write_bytes(data[:-100])  # a short last block: zero-padded, as in the maps
    blocks = np.array([*range(0, 2500), 2600, 2601, 2999])
    padded = data[:-100] + bytes(100)
    want = block_crc32c(padded, BS)[blocks]
    assert np.array_equal(dirty_check.data_crcs(image, blocks, BS), want)


def test_a_kept_map_gives_only_the_blocks_changed_since(copies: tuple[Path, Path]) -> None:
    old, _ = copies
    with pytest.raises(dirty_check.CheckError):  # nothing kept yet
        dirty_check.primary_dirty(old, "v", 1, since_seen=True)
    assert dirty_check.primary_dirty(old, "v", 1, keep=True)["count"] == 2  # 3 and 9
    write(old / "primaries" / "v.img", 20, 0x44)  # written while the compare ran
    write(old / "primaries" / "v.img", 9, 0x45)
    ChecksumMap.build(
        old / "primaries" / "v.img", old / "primaries" / "v.state" / "checksums.map"
    ).close()
    changed = dirty_check.primary_dirty(old, "v", 1, since_seen=True)
    assert changed["scope"] == "since-seen"
    assert dirty_check.unpack_blocks(changed["blocks"], BLOCKS).tolist() == [9, 20]
    assert dirty_check.unpack(changed["crcs"]).tolist() == [
        int(block_crc32c(bytes([b]) * BS)[0]) for b in (0x45, 0x44)
    ]


@pytest.mark.parametrize("held", [False, True], ids=["handed over", "held by the server"])
def test_a_repaired_map_is_trusted_by_the_next_writer(
    copies: tuple[Path, Path], held: bool
) -> None:
    """A repair after the shadow server let go of the map (the hand-over beside the compare)
    stamps the header itself; while the server holds it, the server's close does. Either way
    the promoted `serve` trusts the map: no rebuild from the whole image in the pause."""
    _, new = copies
    image, path = new / "shadows" / "v.img", new / "shadows" / "v.map"
    server = ChecksumMap.load(path, writable=True)
    server.set_epoch(5)
    server.flush()  # the hand-over's checkpoint
    if not held:
        server.close()
    data = b"R" * BS
    body = {"blocks": [7], "data": base64.b64encode(data).decode()}
    assert dirty_check.repair(new, "v", body) == {"repaired": 1}
    if held:
        server.close()
    reopened = ChecksumMap.open_or_rebuild(path, image, BS, writable=True)
    try:
        assert reopened.rebuilt_reason is None
        assert reopened.crcs[7] == block_crc32c(data, BS)[0]
    finally:
        reopened.close()
