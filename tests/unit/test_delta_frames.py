"""The delta stream's wire format: headers, payload checks, HMAC, EXTENT payloads."""

from __future__ import annotations

import asyncio
import os

import pytest
import zstandard

from shadowblk.delta.auth import Session
from shadowblk.delta.extents import decode_extent, encode_extent, runs
from shadowblk.delta.frames import (
    HEADER_SIZE,
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


def test_extent_checks_every_block() -> None:
    data = os.urandom(3 * 4096) + bytes(4096)
    payload = encode_extent(data, 4096, zstandard.ZstdCompressor(level=1))
    dctx = zstandard.ZstdDecompressor()
    assert decode_extent(payload, len(data), 4096, 1, dctx) == data
    crc_damaged = bytearray(payload)
    crc_damaged[5] ^= 1  # the crc of block 1
    with pytest.raises(FrameError, match="block 1"):
        decode_extent(bytes(crc_damaged), len(data), 4096, 1, dctx)
    with pytest.raises(FrameError):  # claims more data than it holds
        decode_extent(payload, len(data) + 4096, 4096, 1, dctx)


def test_a_one_block_extent_is_checked_too() -> None:
    """The one-block path (a random writer's frames) skips the arrays, not the check."""
    data = os.urandom(4096)
    payload = encode_extent(data, 4096, zstandard.ZstdCompressor(level=1))
    dctx = zstandard.ZstdDecompressor()
    assert decode_extent(payload, 4096, 4096, 1, dctx) == data
    for at in (2, len(payload) - 1):  # its crc, then its data (stored: zstd cannot tell)
        damaged = bytearray(payload)
        damaged[at] ^= 1
        with pytest.raises(FrameError, match="block 0"):
            decode_extent(bytes(damaged), 4096, 4096, 1, dctx)


def test_runs_split_zero_blocks_from_data() -> None:
    data = bytes(4096) + os.urandom(8192) + bytes(8192)
    assert list(runs(data, 4096)) == [(0, 4096, True), (4096, 12288, False), (12288, 20480, True)]
