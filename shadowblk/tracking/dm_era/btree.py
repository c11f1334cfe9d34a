"""Single-level persistent-data btrees (dm-btree): every (key, value) in key order.

A node is a 32-byte header (csum, flags, blocknr, nr_entries, max_entries, value_size), then
max_entries u64 keys, then max_entries values; internal nodes hold u64 child locations.
"""

import struct
from collections.abc import Iterator

from shadowblk.tracking.dm_era.blocks import BLOCK_SIZE, BlockReader, EraMetadataError

CSUM_XOR = 121107
INTERNAL_NODE = 1
LEAF_NODE = 2
_HEADER = struct.Struct("<IIQIIII")
MAX_DEPTH = 16  # far beyond any real tree: guards against loops in damaged metadata


def walk(blocks: BlockReader, root: int, value_size: int, what: str) -> Iterator[tuple[int, bytes]]:
    """Every (key, value) of the tree at ROOT in increasing key order, each node verified."""
    last = -1
    for key, value in _walk(blocks, root, value_size, what, 0):
        if key <= last:
            raise EraMetadataError(f"{blocks.path}: {what}: keys out of order ({last}, {key})")
        last = key
        yield key, value


def _walk(
    blocks: BlockReader, location: int, value_size: int, what: str, depth: int
) -> Iterator[tuple[int, bytes]]:
    if depth > MAX_DEPTH:
        raise EraMetadataError(f"{blocks.path}: {what}: btree deeper than {MAX_DEPTH} (a loop?)")
    data = blocks.read_checked(location, f"{what} node", CSUM_XOR)
    _, flags, blocknr, nr_entries, max_entries, node_value_size, _ = _HEADER.unpack_from(data)
    where = f"{blocks.path}: {what} node at block {location}"
    if blocknr != location:
        raise EraMetadataError(f"{where} claims block {blocknr}")
    internal = bool(flags & INTERNAL_NODE)
    if internal == bool(flags & LEAF_NODE):
        raise EraMetadataError(f"{where} has flags {flags:#x}")
    want = 8 if internal else value_size
    if node_value_size != want:
        raise EraMetadataError(f"{where} has values of {node_value_size} bytes, not {want}")
    if nr_entries > max_entries or _HEADER.size + (8 + want) * max_entries > BLOCK_SIZE:
        raise EraMetadataError(f"{where} has {nr_entries}/{max_entries} entries")
    keys = struct.unpack_from(f"<{nr_entries}Q", data, _HEADER.size)
    values_at = _HEADER.size + 8 * max_entries
    for i, key in enumerate(keys):
        value = data[values_at + i * want : values_at + (i + 1) * want]
        if internal:
            yield from _walk(blocks, int.from_bytes(value, "little"), value_size, what, depth + 1)
        else:
            yield key, value
