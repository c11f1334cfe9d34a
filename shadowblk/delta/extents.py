"""EXTENT payloads (a crc32c per block, then one zstd frame) and splitting data into runs.

The shipper encodes; the applier decodes and checks every block's crc after decompression, so
nothing reaches a volume unless it is exactly what the primary read (I4).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import zstandard

from shadowblk.delta.frames import MAX_EXTENT, ErrorCode, FrameError
from shadowblk.integrity.blockcrc import block_crc32c


def encode_extent(
    data: bytes | memoryview, block_size: int, compressor: zstandard.ZstdCompressor
) -> bytes:
    """Payload of an EXTENT frame for DATA (a whole number of blocks)."""
    crcs = block_crc32c(data, block_size).astype(">u4").tobytes()
    return crcs + compressor.compress(data)


def decode_extent(
    payload: bytes, length: int, block_size: int, seq: int, dctx: zstandard.ZstdDecompressor
) -> bytes:
    """The verified data of an EXTENT payload; FrameError (NACKable) on any mismatch."""
    nblocks = length // block_size
    head = 4 * nblocks
    if len(payload) < head:
        raise FrameError(ErrorCode.BAD_PAYLOAD, "EXTENT payload shorter than its crcs", False, seq)
    try:
        data = dctx.decompress(payload[head:], max_output_size=length)
    except zstandard.ZstdError as exc:
        raise FrameError(ErrorCode.BAD_PAYLOAD, f"zstd: {exc}", False, seq) from None
    if len(data) != length:
        raise FrameError(
            ErrorCode.BAD_PAYLOAD, f"EXTENT holds {len(data)} bytes, not {length}", False, seq
        )
    wanted = np.frombuffer(payload, dtype=">u4", count=nblocks)
    bad = np.flatnonzero(block_crc32c(data, block_size) != wanted)
    if bad.size:
        raise FrameError(
            ErrorCode.BAD_PAYLOAD,
            f"block crc32c mismatch at block {int(bad[0])} of EXTENT seq {seq}",
            False,
            seq,
        )
    return data


def check_range(offset: int, length: int, size: int, block_size: int, limit: int | None) -> None:
    """A frame's range must be whole blocks inside the volume (fatal: the header is authentic)."""
    if offset % block_size or length % block_size or length <= 0:
        raise FrameError(ErrorCode.BAD_RANGE, f"range {offset}+{length} is not whole blocks")
    if offset + length > size:
        raise FrameError(ErrorCode.BAD_RANGE, f"range {offset}+{length} beyond volume size {size}")
    if limit is not None and length > limit:
        raise FrameError(ErrorCode.BAD_RANGE, f"EXTENT of {length} bytes exceeds {limit}")


def zero_blocks(data: bytes | memoryview, block_size: int) -> np.ndarray:
    """A bool per block of DATA: True where the block is all zeros."""
    words = np.frombuffer(data, dtype=np.uint64).reshape(-1, block_size // 8)
    return ~words.any(axis=1)


def runs(data: bytes | memoryview, block_size: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_zero) byte runs of DATA, data runs capped at MAX_EXTENT bytes."""
    zeros = zero_blocks(data, block_size)
    n = len(zeros)
    i = 0
    while i < n:
        j = i + 1
        while j < n and zeros[j] == zeros[i]:
            j += 1
        start, end = i * block_size, j * block_size
        if zeros[i]:
            yield start, end, True
        else:
            for s in range(start, end, MAX_EXTENT):
                yield s, min(end, s + MAX_EXTENT), False
        i = j
