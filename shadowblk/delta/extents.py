"""EXTENT payloads: many scattered runs of blocks in one frame (an extent list, a crc32c per
block, then the blocks, compressed once or stored raw), and splitting data into runs.

The shipper encodes; the applier decodes, checks the extent list and every block's crc after
decompression (one native call for the frame), so nothing reaches a volume unless it is exactly
what the primary read (I4). Layout: docs/protocol.md, "EXTENT".
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

from shadowblk._native.blockcrc import first_bad_block, store_crc32c
from shadowblk.delta.frames import FLAG_RAW, MAX_EXTENT, ErrorCode, Frame, FrameError

PROBE = 64 << 10  # bytes compressed first to see whether compressing the frame pays
PAYS = 0.9  # compressing pays when it saves at least a tenth
COUNT = struct.Struct("!I")
ENTRY = np.dtype([("offset", ">u8"), ("length", ">u4")])  # one extent of the list


@dataclass(frozen=True)
class Extents:
    """An EXTENT frame's checked content: sorted, disjoint byte ranges of whole blocks and their
    data, concatenated in that order. HEAD is the payload's bytes before the data (count,
    extent list, crcs): the shadow journals it as it came, and its map takes the crcs from it
    instead of computing them again."""

    offsets: list[int]
    lengths: list[int]
    data: bytes | memoryview
    head: bytes | memoryview

    def crcs(self) -> np.ndarray:
        """The crc32c of each block, in order (big-endian uint32)."""
        return np.frombuffer(
            self.head, dtype=">u4", offset=COUNT.size + ENTRY.itemsize * len(self.offsets)
        )


def encode_extents(
    offsets: np.ndarray,
    lengths: np.ndarray,
    pieces: Sequence[bytes | memoryview],
    block_size: int,
    compressor: zstandard.ZstdCompressor,
) -> tuple[bytes, int]:
    """(payload, flags) of an EXTENT frame for the ranges OFFSETS/LENGTHS (bytes, sorted,
    disjoint, whole blocks) whose data is PIECES, whole blocks each, in order (a captured run
    is one piece: no object per block). Compressed when a probe of its start shows that zstd
    saves a tenth or more; otherwise stored raw (FLAG_RAW), spared the compressor here and the
    decompressor at the shadow, and copied once: straight from the pieces into the payload."""
    total = sum(len(p) for p in pieces)
    crcs = np.empty(total // block_size, dtype=np.uint32)
    writes, at = [], 0
    for piece in pieces:
        writes.append((at, piece))
        at += len(piece)
    stored = store_crc32c(crcs, block_size, writes)
    if stored != len(pieces) or total % block_size:  # never ship an unset crc
        raise ValueError(f"EXTENT piece {stored} is not whole blocks of {block_size} bytes")
    table = np.empty(len(offsets), dtype=ENTRY)
    table["offset"] = offsets
    table["length"] = lengths
    head = COUNT.pack(len(table)) + table.tobytes() + crcs.astype(">u4").tobytes()
    if total > PROBE:
        sample = _start(pieces, PROBE)
        if len(compressor.compress(sample)) > PAYS * len(sample):
            return b"".join([head, *pieces]), FLAG_RAW
    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    packed = compressor.compress(data)
    if len(packed) > PAYS * total:
        return b"".join([head, data]), FLAG_RAW
    return head + packed, 0


def encode_packed(
    payload: bytes, head_len: int, compressor: zstandard.ZstdCompressor
) -> tuple[bytes, int]:
    """(payload, flags) of an EXTENT frame from PAYLOAD, its head (HEAD_LEN bytes) followed by
    its data as `framepack.pack_frame` made it: the same choice as `encode_extents` (a probe
    first, compressed only when it saves a tenth), stored raw without another copy."""
    data = memoryview(payload)[head_len:]
    if len(data) > PROBE and len(compressor.compress(data[:PROBE])) > PAYS * PROBE:
        return payload, FLAG_RAW
    packed = compressor.compress(data)
    if len(packed) > PAYS * len(data):
        return payload, FLAG_RAW
    return payload[:head_len] + packed, 0


def _start(pieces: Sequence[bytes | memoryview], size: int) -> bytes | memoryview:
    """The first SIZE bytes of the pieces' data (a view when the first piece holds them)."""
    if len(pieces[0]) >= size:
        return memoryview(pieces[0])[:size]
    taken, n = [], 0
    for piece in pieces:
        taken.append(piece)
        n += len(piece)
        if n >= size:
            break
    return b"".join(taken)[:size]


def encode_extent(
    offset: int, data: bytes | memoryview, block_size: int, compressor: zstandard.ZstdCompressor
) -> tuple[bytes, int]:
    """(payload, flags) of an EXTENT frame holding one run of blocks, DATA at OFFSET."""
    view = memoryview(data).cast("B")
    one = np.array([offset], dtype=np.uint64)
    return encode_extents(one, np.array([len(view)]), [view], block_size, compressor)


def decode_extents(
    frame: Frame, size: int, block_size: int, dctx: zstandard.ZstdDecompressor
) -> Extents:
    """The verified content of an EXTENT frame of a volume of SIZE bytes. An extent list that is
    not sorted, disjoint whole blocks inside the volume, summing to the header's length and
    starting at its offset, is a fatal FrameError (the payload passed its crc and tag: the
    sender means it); data that does not match its crcs is NACKed."""
    payload, length, seq = frame.payload, frame.length, frame.seq
    if length <= 0 or length % block_size or length > MAX_EXTENT:
        raise FrameError(ErrorCode.BAD_RANGE, f"EXTENT of {length} bytes")
    nblocks = length // block_size
    if len(payload) < COUNT.size:
        raise FrameError(ErrorCode.BAD_PAYLOAD, "EXTENT payload without an extent count")
    (count,) = COUNT.unpack_from(payload)
    if not 0 < count <= nblocks:
        raise FrameError(ErrorCode.BAD_RANGE, f"{count} extents for {nblocks} blocks")
    crcs_at = COUNT.size + count * ENTRY.itemsize
    data_at = crcs_at + 4 * nblocks
    if len(payload) < data_at:
        raise FrameError(ErrorCode.BAD_PAYLOAD, "EXTENT payload shorter than its extents and crcs")
    table = np.frombuffer(payload, dtype=ENTRY, count=count, offset=COUNT.size)
    offsets = table["offset"].astype(np.uint64)
    lengths = table["length"].astype(np.uint64)
    ends = offsets + lengths
    if (
        (offsets % block_size).any()
        or (lengths % block_size).any()
        or not lengths.all()
        or (offsets > size).any()
        or (ends > size).any()
        or (offsets[1:] < ends[:-1]).any()
        or int(lengths.sum()) != length
        or int(offsets[0]) != frame.offset
    ):
        raise FrameError(
            ErrorCode.BAD_RANGE,
            f"EXTENT seq {seq}: its extents are not sorted, disjoint whole blocks inside the "
            f"volume of {size} bytes summing to {length} bytes from offset {frame.offset}",
        )
    body = memoryview(payload)[data_at:]
    if frame.flags & FLAG_RAW:
        data: bytes | memoryview = body
    else:
        try:
            data = dctx.decompress(body, max_output_size=length)
        except zstandard.ZstdError as exc:
            raise FrameError(ErrorCode.BAD_PAYLOAD, f"zstd: {exc}", False, seq) from None
    if len(data) != length:
        raise FrameError(
            ErrorCode.BAD_PAYLOAD, f"EXTENT holds {len(data)} bytes, not {length}", False, seq
        )
    bad = first_bad_block(data, block_size, memoryview(payload)[crcs_at:data_at])
    if bad >= 0:
        raise FrameError(
            ErrorCode.BAD_PAYLOAD,
            f"block crc32c mismatch at block {bad} of EXTENT seq {seq}",
            False,
            seq,
        )
    # a view while the data is one too (RAW: the payload is held anyway); a copy of a few KiB
    # otherwise, so a held epoch does not also keep every compressed payload alive
    head = memoryview(payload)[:data_at] if frame.flags & FLAG_RAW else bytes(payload[:data_at])
    return Extents(offsets.tolist(), lengths.tolist(), data, head)


def unpack_extents(record: bytes | memoryview, length: int, block_size: int) -> Extents:
    """An Extents from the shadow journal's copy of a checked frame (its head, then its LENGTH
    bytes of data, raw); the journal's record crc vouches for it, so only its shape is checked."""
    (count,) = COUNT.unpack_from(record)
    data_at = COUNT.size + count * ENTRY.itemsize + 4 * (length // block_size)
    if len(record) != data_at + length:
        raise ValueError(f"an extents record of {len(record)} bytes for {length} bytes of data")
    table = np.frombuffer(record, dtype=ENTRY, count=count, offset=COUNT.size)
    view = memoryview(record)
    return Extents(
        table["offset"].tolist(), table["length"].tolist(), view[data_at:], view[:data_at]
    )


def check_range(offset: int, length: int, size: int, block_size: int) -> None:
    """A ZERO or TRIM range must be whole blocks inside the volume (fatal: the header is
    authentic)."""
    if offset % block_size or length % block_size or length <= 0:
        raise FrameError(ErrorCode.BAD_RANGE, f"range {offset}+{length} is not whole blocks")
    if offset + length > size:
        raise FrameError(ErrorCode.BAD_RANGE, f"range {offset}+{length} beyond volume size {size}")
