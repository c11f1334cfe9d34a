"""The shadow's side of a live scrub: its image checked against its own checksum map, block
reads for a primary's read-repair, and a scan that names the blocks whose data rotted.

The applier writes a record to the image, then updates the map entry, so a block being applied
can be seen new-data/old-entry for an instant. A mismatch is therefore read again (data and
entry) a few times, RETRY_DELAY apart, before it counts: a block only ever reported or refused
is one whose data stayed different from its entry on every look, which an apply cannot cause.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from shadowblk.integrity.blockcrc import block_crc32c
from shadowblk.integrity.checksum_map import HEADER_BYTES, LiveMap
from shadowblk.integrity.crc_scan import checksum_file
from shadowblk.integrity.rate_limit import TokenBucket
from shadowblk.integrity.tree_wire import MAX_READ

RETRIES = 5
RETRY_DELAY = 0.02


class BlockError(ValueError):
    """A read the shadow will not answer: out of range, misaligned, or data not matching."""


class ShadowBlocks:
    """One volume's image and map on a shadow, as an OPEN of the verify port found them."""

    def __init__(self, image: Path, live: LiveMap) -> None:
        self.image = image
        self.map_path = live.path
        self.block_size = live.block_size
        self.size = live.size
        self.blocks = live.blocks

    def _entries(self, first: int, count: int) -> np.ndarray:
        fd = os.open(self.map_path, os.O_RDONLY)
        try:
            raw = os.pread(fd, 4 * count, HEADER_BYTES + 4 * first)
        finally:
            os.close(fd)
        if len(raw) != 4 * count:
            raise BlockError(f"{self.map_path} is shorter than its header says")
        return np.frombuffer(raw, dtype="<u4")

    def _data(self, offset: int, length: int) -> bytes:
        fd = os.open(self.image, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def _crcs(self, data: bytes) -> np.ndarray:
        bs = self.block_size
        padded = data.ljust(-(-len(data) // bs) * bs, b"\0")  # a short last block, zero-padded
        return block_crc32c(padded, bs)

    def _mismatches(self, offset: int, length: int) -> tuple[bytes, np.ndarray, np.ndarray]:
        """(data, data crcs, map entries) of the range, read again while they disagree."""
        first = offset // self.block_size
        for attempt in range(RETRIES):
            if attempt:
                time.sleep(RETRY_DELAY)
            data = self._data(offset, length)
            if len(data) != length:
                raise BlockError(f"{self.image}: short read at {offset}")
            crcs = self._crcs(data)
            entries = self._entries(first, len(crcs))
            if np.array_equal(crcs, entries):
                break
        return data, crcs, entries

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of whole blocks, answered only if every block matches its map entry."""
        bs = self.block_size
        if offset % bs or offset >= self.size or length <= 0:
            raise BlockError(f"bad range: offset {offset}, length {length}")
        if length > MAX_READ or offset + length > self.size:
            raise BlockError(f"bad range: {length} bytes at {offset} (volume {self.size})")
        if length % bs and offset + length != self.size:
            raise BlockError(f"length {length} is not whole blocks of {bs}")
        data, crcs, entries = self._mismatches(offset, length)
        bad = np.nonzero(crcs != entries)[0]
        if len(bad):
            raise BlockError(f"block {offset // bs + int(bad[0])} does not match its map here")
        return data

    def scan(self, rate: int, limit: int) -> tuple[list[tuple[int, int, int]], bool]:
        """Every block whose data differs from its entry on every look: [(block, data crc,
        map crc)] (at most LIMIT) and whether the list is complete."""
        bucket = TokenBucket(rate) if rate else None
        got = checksum_file(self.image, self.block_size, rate=bucket, in_place=False)
        if len(got) != self.blocks:
            raise BlockError(f"{self.image} is {len(got)} blocks, its map has {self.blocks}")
        entries = self._entries(0, self.blocks)
        found: list[tuple[int, int, int]] = []
        for block in np.nonzero(got != entries)[0].tolist():
            offset = block * self.block_size
            _, crcs, now = self._mismatches(offset, min(self.block_size, self.size - offset))
            if crcs[0] != now[0]:
                if len(found) == limit:
                    return found, False
                found.append((block, int(crcs[0]), int(now[0])))
        return found, True
