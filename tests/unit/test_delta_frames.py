"""The delta stream's wire format: headers, payload checks, HMAC, EXTENT payloads."""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import replace

import crc32c
import numpy as np
import pytest
import zstandard

from shadowblk._native import blockcrc as native
from shadowblk.delta.auth import Session
from shadowblk.delta.epoch import Change, Epoch
from shadowblk.delta.extents import decode_extents, encode_extent, encode_extents
from shadowblk.delta.frames import (
    FLAG_RAW,
    HEADER_SIZE,
    VERSION,
    ErrorCode,
    Frame,
    FrameError,
    FrameType,
    Hello,
    decode_header,
    pack_hello,
    unpack_hello,
    volume_key,
)
from shadowblk.delta.stream import encode, read_frame

KEY = b"k" * 32


def read(wire: bytes, session: Session) -> Frame:
    async def go() -> Frame:
        reader = asyncio.StreamReader()
        reader.feed_data(wire)
        reader.feed_eof()
        return await read_frame(reader, session)

    return asyncio.run(go())


def sample() -> Frame:
    return Frame(FrameType.ZERO, volume_key("v"), 3, 9, 17, 4096, 8192, b"payload")


def test_round_trip_with_hmac() -> None:
    session = Session(KEY, b"a" * 16, b"b" * 16)
    frame = sample()
    assert read(encode(frame, session), session) == frame


def test_header_layout_is_72_bytes_and_checked() -> None:
    wire = bytearray(encode(sample(), Session(None, b"a" * 16)))
    decode_header(bytes(wire[:HEADER_SIZE]))
    assert HEADER_SIZE == 72
    wire[40] ^= 1
    with pytest.raises(FrameError) as err:
        decode_header(bytes(wire[:HEADER_SIZE]))
    assert err.value.fatal and err.value.code is ErrorCode.BAD_HEADER


def test_payload_corruption_is_nackable() -> None:
    session = Session(None, b"a" * 16)
    wire = bytearray(encode(sample(), session))
    wire[HEADER_SIZE + 2] ^= 0x10
    with pytest.raises(FrameError) as err:
        read(bytes(wire), session)
    assert not err.value.fatal and err.value.seq == 17
    assert err.value.code is ErrorCode.BAD_PAYLOAD


def test_hmac_binds_key_and_session() -> None:
    wire = encode(sample(), Session(KEY, b"a" * 16, b"b" * 16))
    for other in (Session(b"x" * 32, b"a" * 16, b"b" * 16), Session(KEY, b"a" * 16, b"c" * 16)):
        with pytest.raises(FrameError) as err:
            read(wire, other)
        assert err.value.code is ErrorCode.AUTH and not err.value.fatal
    with pytest.raises(FrameError) as err:  # an untagged frame where a key is required
        read(encode(sample(), Session(None, b"a" * 16)), Session(KEY, b"a" * 16))
    assert err.value.code is ErrorCode.AUTH


def test_hello_round_trip_and_bad_volume_id() -> None:
    hello = Hello("vol-1", 1 << 30, 4096, 5, 12, b"n" * 16)
    assert unpack_hello(pack_hello(hello)) == hello
    with pytest.raises(FrameError):
        unpack_hello(pack_hello(hello)[:-1])


SIZE = 64 << 20
DCTX = zstandard.ZstdDecompressor()


def extent_frame(changes: list[Change], index: int = 0) -> Frame:
    change = changes[index]
    assert change.type is FrameType.EXTENT
    return Frame(
        change.type, 1, 1, 1, 1, change.offset, change.length, change.payload, change.flags
    )


def test_one_frame_carries_many_scattered_runs() -> None:
    """A random writer's blocks share frames; zero blocks travel as ZERO, without data."""
    rng = random.Random(1)
    blocks = {b: rng.randbytes(4096) for b in rng.sample(range(SIZE // 4096), 600)}
    blocks.update({b: bytes(4096) for b in (3, 4, 9)})
    epoch = Epoch(4096)
    for block, data in blocks.items():
        epoch.put(block, data)
    changes = list(epoch.changes(1))
    extents = [c for c in changes if c.type is FrameType.EXTENT]
    assert len(extents) == 3  # 600 one-block runs, MAX_EXTENT / 4096 = 256 blocks a frame
    assert {(c.offset, c.length) for c in changes if c.type is FrameType.ZERO} == {
        (3 * 4096, 8192),
        (9 * 4096, 4096),
    }
    seen = {}
    for i, change in enumerate(changes):
        if change.type is not FrameType.EXTENT:
            continue
        got = decode_extents(extent_frame(changes, i), SIZE, 4096, DCTX)
        assert len(got.offsets) > 1 and got.offsets == sorted(got.offsets)
        view, at = memoryview(got.data), 0
        for offset, length in zip(got.offsets, got.lengths, strict=True):
            for k in range(length // 4096):
                seen[offset // 4096 + k] = bytes(view[at + k * 4096 : at + (k + 1) * 4096])
            at += length
    assert seen == {b: d for b, d in blocks.items() if any(d)}


@pytest.mark.parametrize("compressible", [True, False])
def test_extent_checks_every_block(compressible: bool) -> None:
    data = (b"abcd" * 3072 if compressible else os.urandom(3 * 4096)) + os.urandom(4096)
    payload, flags = encode_extent(8192, data, 4096, zstandard.ZstdCompressor(level=1))
    assert bool(flags & FLAG_RAW) is not compressible
    frame = Frame(FrameType.EXTENT, 1, 1, 1, 1, 8192, len(data), payload, flags)
    got = decode_extents(frame, SIZE, 4096, DCTX)
    assert (got.offsets, got.lengths, bytes(got.data)) == ([8192], [len(data)], data)
    crcs_at = 4 + 12  # the count, one extent
    for at in (crcs_at + 5, len(payload) - 1):  # the crc of block 1, then the last block's data
        damaged = bytearray(payload)
        damaged[at] ^= 1
        with pytest.raises(FrameError) as err:
            decode_extents(replace(frame, payload=bytes(damaged)), SIZE, 4096, DCTX)
        assert not err.value.fatal and err.value.code is ErrorCode.BAD_PAYLOAD
    with pytest.raises(FrameError) as err:  # the header claims more data than the list
        decode_extents(replace(frame, length=len(data) + 4096), SIZE, 4096, DCTX)
    assert err.value.fatal and err.value.code is ErrorCode.BAD_RANGE


def test_a_bad_extent_list_is_refused() -> None:
    data = os.urandom(2 * 4096)
    lists = [
        ([0, 0], [4096, 4096]),  # overlapping
        ([8192, 0], [4096, 4096]),  # not sorted
        ([0, SIZE], [4096, 4096]),  # beyond the volume
        ([0, 100], [4096, 4096]),  # not whole blocks
        ([0], [8192 + 4096]),  # more than the data
    ]
    for offsets, lengths in lists:
        payload, flags = encode_extents(
            np.array(offsets, dtype=np.uint64), np.array(lengths), [data[:4096], data[4096:]], 4096,
            zstandard.ZstdCompressor(level=1),
        )  # fmt: skip
        frame = Frame(FrameType.EXTENT, 1, 1, 1, 1, offsets[0], len(data), payload, flags)
        with pytest.raises(FrameError) as err:
            decode_extents(frame, SIZE, 4096, DCTX)
        assert err.value.fatal and err.value.code is ErrorCode.BAD_RANGE, (offsets, lengths)


def test_an_older_version_is_refused_clearly() -> None:
    wire = bytearray(encode(sample(), Session(None, b"a" * 16)))
    wire[4] = VERSION - 1
    head = bytes(wire[: HEADER_SIZE - 4])
    head += crc32c.crc32c(head).to_bytes(4, "big")
    with pytest.raises(FrameError, match=f"protocol version {VERSION - 1}") as err:
        decode_header(head)
    assert err.value.fatal and err.value.code is ErrorCode.VERSION


@pytest.mark.parametrize("block_size", [512, 4096, 65536])
def test_first_bad_block_finds_the_first_damaged_block(block_size: int) -> None:
    """The shadow's one-call check agrees with crc32c applied block by block."""
    rng = random.Random(block_size)
    data = bytearray(rng.randbytes(block_size * 9))
    crcs = b"".join(
        crc32c.crc32c(data[i : i + block_size]).to_bytes(4, "big")
        for i in range(0, len(data), block_size)
    )
    assert native.first_bad_block(data, block_size, crcs) == -1
    for bad in (8, 3, 0):  # a later damage never hides an earlier one
        data[bad * block_size + rng.randrange(block_size)] ^= 0x40
        assert native.first_bad_block(data, block_size, crcs) == bad
    with pytest.raises(ValueError):
        native.first_bad_block(data, block_size, crcs[:-4])
