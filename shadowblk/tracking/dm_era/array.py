"""Persistent-data arrays (dm-array) and bitsets (dm-bitset) read whole into numpy.

An array is a btree from block index to the location of an array block; an array block is a
24-byte header (csum, max_entries, nr_entries, value_size, blocknr) and packed values. A bitset
is an array of little-endian u64 words, bit i of the set being bit i % 64 of word i // 64.
"""

import struct

import numpy as np

from shadowblk.tracking.dm_era import btree
from shadowblk.tracking.dm_era.blocks import BLOCK_SIZE, BlockReader, EraMetadataError

CSUM_XOR = 595846735
_HEADER = struct.Struct("<IIIIQ")


def read_array(blocks: BlockReader, root: int, dtype: str, length: int, what: str) -> np.ndarray:
    """The LENGTH values of the array at ROOT; a missing, extra or damaged block is an error."""
    value_size = np.dtype(dtype).itemsize
    full = (BLOCK_SIZE - _HEADER.size) // value_size
    parts = []
    for index, (key, value) in enumerate(btree.walk(blocks, root, 8, f"{what} btree")):
        location = int.from_bytes(value, "little")
        if key != index:
            raise EraMetadataError(f"{blocks.path}: {what}: array block {index} is missing")
        data = blocks.read_checked(location, f"{what} array block", CSUM_XOR)
        _, max_entries, nr_entries, block_value_size, blocknr = _HEADER.unpack_from(data)
        where = f"{blocks.path}: {what} array block at {location}"
        if blocknr != location:
            raise EraMetadataError(f"{where} claims block {blocknr}")
        if block_value_size != value_size or max_entries != full or nr_entries > max_entries:
            raise EraMetadataError(
                f"{where}: {nr_entries}/{max_entries} entries of {block_value_size} bytes"
            )
        if parts and len(parts[-1]) != full:
            raise EraMetadataError(f"{where} follows a block that is not full")
        parts.append(np.frombuffer(data, dtype, nr_entries, _HEADER.size))
    values = np.concatenate(parts) if parts else np.empty(0, dtype)
    if len(values) != length:
        raise EraMetadataError(f"{blocks.path}: {what} has {len(values)} entries, wants {length}")
    return values


def read_bitset(blocks: BlockReader, root: int, nr_bits: int, what: str) -> np.ndarray:
    """The NR_BITS bits of the bitset at ROOT as a boolean array."""
    words = read_array(blocks, root, "<u8", -(-nr_bits // 64), what)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return bits[:nr_bits].astype(bool)
