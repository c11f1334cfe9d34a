"""The metadata device as 4 KiB blocks, each checked the way the kernel checks it before use.

Every persistent-data block starts with a crc32c of the rest of the block, salted by an xor
constant per block type, and records its own location, so a block read from the wrong place,
a torn write or any flipped bit is caught here rather than turned into a wrong answer.
"""

import os
from pathlib import Path

import crc32c

BLOCK_SIZE = 4096  # dm-era's metadata block size (DM_ERA_METADATA_BLOCK_SIZE)


class EraMetadataError(ValueError):
    """The metadata is not dm-era metadata, or it is damaged, truncated or inconsistent."""


def dm_checksum(data: bytes, xor: int) -> int:
    """The kernel's dm_bm_checksum: crc32c seeded with ~0, without the final inversion, ^ XOR."""
    return crc32c.crc32c(data) ^ 0xFFFFFFFF ^ xor


class BlockReader:
    """Reads whole metadata blocks from a file or block device."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        # The kernel writes metadata around the page cache (dm-bufio), and a device held open by
        # the era target keeps its cache: drop it, or a live device reads as its stale past.
        os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self.nr_blocks = self._file.seek(0, 2) // BLOCK_SIZE

    def read(self, location: int, what: str) -> bytes:
        """Block LOCATION; a location past the end of the device is an error, not zeroes."""
        if not 0 <= location < self.nr_blocks:
            raise EraMetadataError(
                f"{self.path}: {what} at block {location} is beyond the device's "
                f"{self.nr_blocks} blocks (truncated or corrupt metadata)"
            )
        self._file.seek(location * BLOCK_SIZE)
        data = self._file.read(BLOCK_SIZE)
        if len(data) != BLOCK_SIZE:
            raise EraMetadataError(f"{self.path}: short read of {what} at block {location}")
        return data

    def read_checked(self, location: int, what: str, xor: int) -> bytes:
        """Block LOCATION, its checksum verified (see verify)."""
        data = self.read(location, what)
        self.verify(data, location, what, xor)
        return data

    def verify(self, data: bytes, location: int, what: str, xor: int) -> None:
        """Check the u32 checksum at the start of DATA against the rest of the block."""
        if dm_checksum(data[4:], xor) != int.from_bytes(data[:4], "little"):
            raise EraMetadataError(f"{self.path}: bad checksum in {what} at block {location}")

    def close(self) -> None:
        self._file.close()
