"""Damaged dm-era metadata gives a clear error, never a wrong list of blocks."""

import random
import struct
from pathlib import Path

import pytest

from shadowblk.tracking.dm_era import EraMetadata, EraMetadataError
from shadowblk.tracking.dm_era.blocks import BLOCK_SIZE, BlockReader, dm_checksum
from shadowblk.tracking.dm_era.superblock import CSUM_XOR
from tests.unit.dm_era_images import unpack


def answers(path: Path, snapshot: bool) -> list[list[int]]:
    md = EraMetadata.open(path, snapshot=snapshot)
    return [list(md.written_since(e)) for e in range(md.current_era + 2)]


def flip(path: Path, offset: int, mask: int) -> None:
    """XOR the byte at OFFSET with MASK, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def forge_superblock(path: Path, offset: int, fmt: str, value: int) -> None:
    """Change one superblock field and re-seal its checksum, as a buggy writer would."""
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    struct.pack_into("<I", data, 0, dm_checksum(bytes(data[4:BLOCK_SIZE]), CSUM_XOR))
    path.write_bytes(bytes(data))


def blocks_of_the_view(path: Path, snapshot: bool, monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Every block location the reader reads to build the view."""
    seen: set[int] = set()
    read = BlockReader.read

    def recording(self: BlockReader, location: int, what: str) -> bytes:
        seen.add(location)
        return read(self, location, what)

    with monkeypatch.context() as patch:
        patch.setattr(BlockReader, "read", recording)
        EraMetadata.open(path, snapshot=snapshot)
    return seen


@pytest.mark.parametrize(("name", "sample"), [("small", None), ("big", 12)])
@pytest.mark.parametrize("snapshot", [True, False])
def test_a_flipped_bit_in_the_view_is_an_error_elsewhere_harmless(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, sample: int | None, snapshot: bool
) -> None:
    path, _ = unpack(name, tmp_path)
    good = path.read_bytes()
    want = answers(path, snapshot)
    view = blocks_of_the_view(path, snapshot, monkeypatch)
    used = [
        b
        for b in range(len(good) // BLOCK_SIZE)
        if any(good[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE])
    ]
    rng = random.Random(10)
    for block in (
        used if sample is None else rng.sample(used, sample) + rng.sample(sorted(view), sample)
    ):
        offset = block * BLOCK_SIZE + rng.randrange(BLOCK_SIZE)
        mask = 1 << rng.randrange(8)
        flip(path, offset, mask)
        if block in view:
            with pytest.raises(EraMetadataError):
                answers(path, snapshot)
        else:
            assert answers(path, snapshot) == want, f"wrong answer after flipping byte {offset}"
        flip(path, offset, mask)  # back as it was


def test_truncated_metadata_is_an_error(tmp_path: Path) -> None:
    path, _ = unpack("small", tmp_path)
    good = path.read_bytes()
    want = answers(path, True)
    for blocks in (0, 1, 8):
        path.write_bytes(good[: blocks * BLOCK_SIZE])
        with pytest.raises(EraMetadataError):
            EraMetadata.open(path)
    path.write_bytes(good[: 100 * BLOCK_SIZE + 123])  # past every used block: still readable
    assert answers(path, True) == want


def test_foreign_or_blank_devices_are_refused(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.write_bytes(bytes(8 * BLOCK_SIZE))
    with pytest.raises(EraMetadataError, match="never formatted"):
        EraMetadata.open(blank)
    noise = tmp_path / "noise"
    noise.write_bytes(random.Random(1).randbytes(8 * BLOCK_SIZE))
    with pytest.raises(EraMetadataError, match="not dm-era metadata"):
        EraMetadata.open(noise)


def test_no_snapshot_taken(tmp_path: Path) -> None:
    path, case = unpack("small", tmp_path)
    forge_superblock(path, 216, "<Q", 0)  # metadata_snap
    with pytest.raises(EraMetadataError, match="no metadata snapshot"):
        EraMetadata.open(path, snapshot=True)
    assert EraMetadata.open(path, snapshot=False).current_era == case.final_era


def test_a_root_pointing_at_the_wrong_kind_of_block_is_refused(tmp_path: Path) -> None:
    path, _ = unpack("small", tmp_path)
    live = EraMetadata.open(path, snapshot=False).superblock
    forge_superblock(
        path, 208, "<Q", live.writeset_tree_root
    )  # era_array_root -> a btree of writesets
    with pytest.raises(EraMetadataError):
        EraMetadata.open(path, snapshot=False)


def test_a_superblock_claiming_another_location_is_refused(tmp_path: Path) -> None:
    path, _ = unpack("small", tmp_path)
    forge_superblock(path, 8, "<Q", 5)  # blocknr
    with pytest.raises(EraMetadataError, match="claims block 5"):
        EraMetadata.open(path)
