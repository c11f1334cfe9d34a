"""EXTENT payloads (a crc32c per block, then one zstd frame) and splitting data into runs.

The shipper encodes; the applier decodes and checks every block's crc after decompression, so
nothing reaches a volume unless it is exactly what the primary read (I4).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from itertools import pairwise

import crc32c
import numpy as np
import zstandard

from shadowblk.delta.frames import MAX_EXTENT, ErrorCode, FrameError
from shadowblk.integrity.blockcrc import block_crc32c

PROBE = 64 << 10  # bytes compressed first to see whether compressing the extent pays
PAYS = 0.9  # compressing pays when it saves at least a tenth
_ZSTD_HEAD = struct.Struct("<IBI")  # magic, frame header descriptor, content size
_ZSTD_MAGIC = 0xFD2FB528
_RAW_BLOCK = 128 << 10  # the largest block zstd allows


def encode_extent(
    data: bytes | memoryview,
    block_size: int,
    compressor: zstandard.ZstdCompressor,
    crcs: bytes | None = None,
) -> bytes:
    """Payload of an EXTENT frame for DATA (a whole number of blocks). Compressed when a probe
    of its start shows that zstd saves a tenth or more; otherwise stored in a zstd frame of raw
    blocks, built without running the compressor (and copied, not decoded, by the shadow).
    CRCS: the blocks' big-endian crc32c, if the caller computed them with others'."""
    view = memoryview(data).cast("B")
    if crcs is None:
        crcs = block_crc32c(view, block_size).astype(">u4").tobytes()
    probe = view[:PROBE]
    if len(probe) < len(view) and len(compressor.compress(probe)) > PAYS * len(probe):
        return b"".join([crcs, *stored_frame(view)])
    packed = compressor.compress(view)
    if len(packed) > PAYS * len(view):
        return b"".join([crcs, *stored_frame(view)])
    return crcs + packed


def stored_frame(data: memoryview) -> list[bytes | memoryview]:
    """The pieces of a standard zstd frame holding DATA (at most 4 GiB) in raw blocks: single
    segment, 4-byte content size, no checksum (every block has its crc32c already)."""
    pieces: list[bytes | memoryview] = [_ZSTD_HEAD.pack(_ZSTD_MAGIC, 0xA0, len(data))]
    for start in range(0, len(data), _RAW_BLOCK):
        block = data[start : start + _RAW_BLOCK]
        last = int(start + _RAW_BLOCK >= len(data))
        pieces.append((len(block) << 3 | last).to_bytes(3, "little"))  # block type 0: raw
        pieces.append(block)
    if not len(data):
        pieces.append((1).to_bytes(3, "little"))  # one empty last block
    return pieces


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
    if nblocks == 1:  # a random writer's extents: spare the arrays
        if crc32c.crc32c(data) == int.from_bytes(payload[:4], "big"):
            return data
        bad = np.zeros(1, dtype=np.int64)
    else:
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
    edges = [0, *(np.flatnonzero(zeros[1:] != zeros[:-1]) + 1).tolist(), len(zeros)]
    for i, j in pairwise(edges):
        if i == j:
            continue  # no blocks at all
        start, end = i * block_size, j * block_size
        if zeros[i]:
            yield start, end, True
        else:
            for s in range(start, end, MAX_EXTENT):
                yield s, min(end, s + MAX_EXTENT), False
