"""The dm-era superblock (block 0) and its copy made by take_metadata_snap."""

import struct
from dataclasses import dataclass

from shadowblk.tracking.dm_era.blocks import BlockReader, EraMetadataError

MAGIC = 2126579579
CSUM_XOR = 146538381
VERSION = 1
METADATA_BLOCK_SECTORS = 8

# csum flags blocknr uuid magic version sm_root data_block_size metadata_block_size nr_blocks
# current_era current_writeset(nr_bits root) writeset_tree_root era_array_root metadata_snap
_LAYOUT = struct.Struct("<IIQ16sQI128sIIIIIQQQQ")


@dataclass(frozen=True)
class Superblock:
    """The fields of a superblock that a reader needs."""

    location: int
    data_block_sectors: int
    nr_blocks: int
    current_era: int
    current_writeset_bits: int
    current_writeset_root: int
    writeset_tree_root: int
    era_array_root: int
    metadata_snap: int


def read_superblock(blocks: BlockReader, location: int) -> Superblock:
    """The superblock at LOCATION, its magic, checksum, location and version verified."""
    what = "superblock" if location == 0 else "metadata snapshot superblock"
    data = blocks.read(location, what)
    fields = _LAYOUT.unpack_from(data)
    (_, _, blocknr, _, magic, version, _, data_block, meta_block, nr_blocks, era,
     ws_bits, ws_root, ws_tree, era_array, snap) = fields  # fmt: skip
    if magic != MAGIC:
        if not any(data):
            raise EraMetadataError(f"{blocks.path}: {what} is all zeroes (never formatted)")
        raise EraMetadataError(f"{blocks.path}: not dm-era metadata (magic {magic} in {what})")
    blocks.verify(data, location, what, CSUM_XOR)
    if blocknr != location:
        raise EraMetadataError(f"{blocks.path}: {what} claims block {blocknr}, read at {location}")
    if version != VERSION:
        raise EraMetadataError(f"{blocks.path}: dm-era metadata version {version} is unknown")
    if meta_block != METADATA_BLOCK_SECTORS or data_block < 8:
        raise EraMetadataError(
            f"{blocks.path}: unexpected block sizes in {what}: metadata {meta_block}, "
            f"data {data_block} sectors"
        )
    return Superblock(location, data_block, nr_blocks, era, ws_bits, ws_root, ws_tree,
                      era_array, snap)  # fmt: skip
