"""Which blocks of an origin dm-era saw written, read from its metadata device on the host.

The era array holds, per block, the era of its last write once the kernel has digested the
archived writesets into it; writesets not digested yet are still in the writeset tree. A block
was written since era N when either says so: the same answer as `era_invalidate --written-since`.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Self

import numpy as np

from shadowblk.tracking.bitmap import DirtyBitmap
from shadowblk.tracking.dm_era import btree
from shadowblk.tracking.dm_era.array import read_array, read_bitset
from shadowblk.tracking.dm_era.blocks import BlockReader, EraMetadataError
from shadowblk.tracking.dm_era.superblock import Superblock, read_superblock

SECTOR = 512
_WRITESET = 12  # struct writeset_disk: nr_bits u32, root u64


class EraMetadata:
    """A consistent view of dm-era metadata: the snapshot, or the last committed live state.

    Read the snapshot (after `dmsetup message ERA 0 take_metadata_snap`) while the target is
    active; the live view is only consistent once the target is suspended or removed.
    """

    def __init__(self, path: Path, superblock: Superblock, eras: np.ndarray,
                 writesets: dict[int, np.ndarray]) -> None:  # fmt: skip
        self.path = path
        self.superblock = superblock
        self.eras = eras  # per block: the era of its last write, as far as digested
        self.writesets = writesets  # archived era -> its bits, not yet digested

    @classmethod
    def open(cls, path: str | Path, snapshot: bool = True) -> Self:
        """Read and verify the whole view at once; any damage raises EraMetadataError."""
        path = Path(path)
        blocks = BlockReader(path)
        try:
            sb = read_superblock(blocks, 0)
            if snapshot:
                if sb.metadata_snap == 0:
                    raise EraMetadataError(f"{path}: no metadata snapshot taken")
                sb = read_superblock(blocks, sb.metadata_snap)
            eras = read_array(blocks, sb.era_array_root, "<u4", sb.nr_blocks, "era array")
            writesets = {}
            for era, value in btree.walk(blocks, sb.writeset_tree_root, _WRITESET, "writesets"):
                nr_bits = int.from_bytes(value[:4], "little")
                root = int.from_bytes(value[4:], "little")
                bits = read_bitset(blocks, root, nr_bits, f"writeset of era {era}")
                writesets[era] = bits[: sb.nr_blocks]
        finally:
            blocks.close()
        return cls(path, sb, eras, writesets)

    @property
    def current_era(self) -> int:
        """The era in progress: for a snapshot, the one that began when it was taken."""
        return self.superblock.current_era

    @property
    def block_size(self) -> int:
        """The tracking granularity in bytes (the era target's block size)."""
        return self.superblock.data_block_sectors * SECTOR

    @property
    def nr_blocks(self) -> int:
        return self.superblock.nr_blocks

    def written_mask(self, era: int) -> np.ndarray:
        """Per block: written in ERA or later (era 0 counts never-written blocks too)."""
        mask = self.eras >= era
        for archived, bits in self.writesets.items():
            if archived >= era:
                mask[: len(bits)] |= bits
        return mask

    def written_since(self, era: int) -> Iterator[int]:
        """Indexes of the blocks written in ERA or later, in increasing order."""
        yield from (int(b) for b in np.flatnonzero(self.written_mask(era)))

    def written_extents(self, era: int, size: int | None = None) -> Iterator[tuple[int, int]]:
        """(offset, length) byte runs of the blocks written since ERA, clipped to SIZE if given."""
        mask = self.written_mask(era).astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask, [0]))))
        limit = self.nr_blocks * self.block_size if size is None else size
        for first, end in zip(edges[::2], edges[1::2], strict=True):
            offset = int(first) * self.block_size
            length = min(int(end) * self.block_size, limit) - offset
            if length > 0:
                yield offset, length

    def dirty_bitmap(self, era: int, size: int) -> DirtyBitmap:
        """The blocks written since ERA as a DirtyBitmap of a SIZE-byte volume, for the shipper."""
        bitmap = DirtyBitmap(size, self.block_size)
        extents = list(self.written_extents(era, size))
        bitmap.mark_many([o for o, _ in extents], [n for _, n in extents])
        return bitmap
