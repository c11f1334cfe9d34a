"""block_crc32c against the crc32c package, block by block, in hardware and in software."""

from __future__ import annotations

import os

import crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowblk._native import blockcrc as native
from shadowblk.integrity.blockcrc import (
    block_crc32c,
    hardware_crc32c,
    reference_block_crc32c,
)

BLOCK_SIZES = [512, 1024, 4096, 65536, 1 << 20]


def per_block(data: bytes, block_size: int) -> list[int]:
    return [crc32c.crc32c(data[i : i + block_size]) for i in range(0, len(data), block_size)]


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=40_000),
    st.sampled_from([1, 3, 8, 100, 191, 192, 200, 512, 4096, 5000]),
    st.booleans(),
)
def test_random_buffers_match_the_package(data: bytes, block_size: int, hardware: bool) -> None:
    got = native.block_crc32c(data, block_size, hardware)
    assert got.dtype == np.uint32
    assert got.tolist() == per_block(data, block_size)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("tail", [0, 1, 7, 333])
def test_block_sizes_and_partial_last_block(block_size: int, tail: int) -> None:
    data = os.urandom(4 * block_size + tail)
    expected = per_block(data, block_size)
    assert len(expected) == 4 + (tail > 0)
    assert block_crc32c(data, block_size).tolist() == expected
    assert native.block_crc32c(data, block_size, False).tolist() == expected
    assert reference_block_crc32c(data, block_size).tolist() == expected


def test_empty_buffer_gives_no_checksums() -> None:
    for fn in (block_crc32c, reference_block_crc32c):
        result = fn(b"", 4096)
        assert result.dtype == np.uint32 and result.shape == (0,)


def test_bytes_like_inputs() -> None:
    data = os.urandom(3 * 4096 + 100)
    expected = per_block(data, 4096)
    words = np.frombuffer(data[: 3 * 4096], dtype=np.uint64)
    assert block_crc32c(bytearray(data)).tolist() == expected
    assert block_crc32c(memoryview(data)).tolist() == expected
    assert block_crc32c(memoryview(data)[4096:]).tolist() == expected[1:]
    assert block_crc32c(np.frombuffer(data, dtype=np.uint8)).tolist() == expected
    assert block_crc32c(words).tolist() == expected[:3]
    assert reference_block_crc32c(words).tolist() == expected[:3]


def test_known_value() -> None:
    # the check value of CRC-32C (iSCSI, RFC 3720 appendix B.4)
    assert block_crc32c(b"123456789").tolist() == [0xE3069283]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_crc32c(b"abc", 0)
    with pytest.raises(ValueError, match="block_size"):
        reference_block_crc32c(b"abc", -1)
    with pytest.raises(TypeError):
        block_crc32c("text is not bytes")
    with pytest.raises(BufferError):
        block_crc32c(memoryview(os.urandom(100))[::2])  # not contiguous


def test_hardware_detection_matches_the_cpu() -> None:
    with open("/proc/cpuinfo") as cpuinfo:
        flags = cpuinfo.read()
    assert hardware_crc32c() == (" sse4_2" in flags)


@pytest.mark.parametrize("block_size", [512, 4096])
def test_store_writes_whole_blocks_in_place_and_stops_at_a_partial_one(block_size: int) -> None:
    rng = np.random.default_rng(7)
    entries = np.zeros(16, dtype="<u4")
    first, second = rng.bytes(2 * block_size), rng.bytes(block_size)
    writes = [
        (0, first),
        (5 * block_size, bytearray(second)),  # any buffer
        (3 * block_size + 1, rng.bytes(block_size)),  # partial: the caller's slower path
        (9 * block_size, rng.bytes(block_size)),
    ]
    assert native.store_crc32c(entries, block_size, writes) == 2
    assert entries[:2].tolist() == per_block(first, block_size)
    assert entries[5] == crc32c.crc32c(second)
    assert entries[3] == entries[4] == entries[9] == 0
    assert native.store_crc32c(entries, block_size, writes, 3) == 4
    assert entries[9] == crc32c.crc32c(writes[3][1])


def test_store_refuses_writes_past_the_map_and_odd_lengths() -> None:
    entries = np.zeros(4, dtype="<u4")
    assert native.store_crc32c(entries, 4096, [(3 * 4096, bytes(8192))]) == 0
    assert native.store_crc32c(entries, 4096, [(0, bytes(4095))]) == 0
    assert native.store_crc32c(entries, 4096, [(0, b"")]) == 0
    assert not entries.any()
