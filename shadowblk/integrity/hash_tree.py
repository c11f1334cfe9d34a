"""A hash tree (Merkle tree) over a checksum map: two volumes whose trees share a root hold the
same crcs, and the subtrees that differ lead to the differing blocks in O(log n) steps each.

Level 0 holds the leaves, one per `leaf_blocks` consecutive blocks, each the blake2b of those
blocks' crc32c values (u32 little-endian); every level above hashes `fanout` consecutive digests
of the level below; the top level has one node, the root.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class TreeGeometry:
    """What two trees must share to be compared node by node."""

    blocks: int
    block_size: int
    fanout: int
    leaf_blocks: int
    digest_size: int

    def __post_init__(self) -> None:
        if self.blocks <= 0:
            raise ValueError(f"a tree needs at least one block, got {self.blocks}")
        if self.fanout < 2 or self.leaf_blocks < 1:
            raise ValueError(f"fanout {self.fanout} must be >= 2, leaf_blocks >= 1")
        if not 1 <= self.digest_size <= 64:
            raise ValueError(f"digest_size {self.digest_size} must be in 1..64 bytes")

    @cached_property
    def level_sizes(self) -> tuple[int, ...]:
        """Node count of every level, leaves first, root last."""
        sizes = [-(-self.blocks // self.leaf_blocks)]
        while sizes[-1] > 1:
            sizes.append(-(-sizes[-1] // self.fanout))
        return tuple(sizes)

    def block_span(self, level: int, node: int) -> tuple[int, int]:
        """The blocks [first, end) under `node` of `level`."""
        width = self.leaf_blocks * self.fanout**level
        return node * width, min((node + 1) * width, self.blocks)

    def child_span(self, level: int, node: int) -> tuple[int, int]:
        """The children [first, end) of `node`: nodes of level-1, or blocks under a leaf."""
        if level == 0:
            return self.block_span(0, node)
        below = self.level_sizes[level - 1]
        return node * self.fanout, min((node + 1) * self.fanout, below)


class HashTree:
    """The tree over a live crc array; `refresh` re-hashes after the array changed."""

    def __init__(
        self,
        crcs: np.ndarray,
        block_size: int,
        fanout: int = 64,
        leaf_blocks: int = 64,
        digest_size: int = 8,
    ) -> None:
        self.crcs = crcs
        self.geometry = TreeGeometry(len(crcs), block_size, fanout, leaf_blocks, digest_size)
        self.levels = [bytearray(n * digest_size) for n in self.geometry.level_sizes]
        self._rehash(0, self.geometry.blocks)

    @property
    def depth(self) -> int:
        return len(self.levels)

    @property
    def root(self) -> bytes:
        return bytes(self.levels[-1])

    def children(self, level: int, node: int) -> bytes:
        """The serialised children of a node: child digests, or the leaf's crcs (u32 LE)."""
        first, end = self.geometry.child_span(level, node)
        if level == 0:
            return self.crcs[first:end].astype("<u4", copy=False).tobytes()
        d = self.geometry.digest_size
        return bytes(self.levels[level - 1][first * d : end * d])

    def refresh(self, offset: int, length: int) -> None:
        """Re-hash the path from the blocks of byte range [offset, offset+length) to the root."""
        bs = self.geometry.block_size
        end = offset + length
        if offset < 0 or length <= 0 or end > self.geometry.blocks * bs:
            raise ValueError(f"range offset={offset} length={length} outside the tree")
        self._rehash(offset // bs, -(-end // bs))

    def _rehash(self, first_block: int, end_block: int) -> None:
        g = self.geometry
        lo, hi = first_block // g.leaf_blocks, -(-end_block // g.leaf_blocks)
        for level in range(self.depth):
            out = self.levels[level]
            for node in range(lo, hi):
                h = hashlib.blake2b(self.children(level, node), digest_size=g.digest_size)
                out[node * g.digest_size : (node + 1) * g.digest_size] = h.digest()
            lo, hi = lo // g.fanout, -(-hi // g.fanout)
