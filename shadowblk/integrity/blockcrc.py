"""Per-block crc32c (Castagnoli) of a buffer: the checksums shipped with every delta extent and
kept in the checksum maps. The fast path is in csrc/blockcrc.pyx; the reference here is the
`crc32c` package applied block by block, which the tests compare it with."""

from __future__ import annotations

import crc32c
import numpy as np

from shadowblk._native import blockcrc as _native

BytesLike = bytes | bytearray | memoryview | np.ndarray  # any C-contiguous buffer works


def hardware_crc32c() -> bool:
    """Whether checksums run on the CPU's crc32 instruction (SSE4.2) rather than a table."""
    return bool(_native.hardware_crc32c())


def block_crc32c(buf: BytesLike, block_size: int = 4096) -> np.ndarray:
    """The crc32c of each block of a contiguous bytes-like buffer as uint32; the last block may
    be short and is checksummed as it is. Releases the GIL while it computes."""
    return _native.block_crc32c(buf, block_size)


def reference_block_crc32c(buf: BytesLike, block_size: int = 4096) -> np.ndarray:
    """The same as block_crc32c, one crc32c.crc32c call per block: slow and obviously right."""
    if block_size <= 0:
        raise ValueError(f"block_size {block_size} must be positive")
    view = memoryview(buf).cast("B")
    return np.array(
        [crc32c.crc32c(view[i : i + block_size]) for i in range(0, len(view), block_size)],
        dtype=np.uint32,
    )
