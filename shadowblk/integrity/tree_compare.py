"""Compare two volumes' hash trees by message exchange, counting every byte exchanged.

The side that starts (usually the primary) holds its own tree and a `send(request) -> reply`
callable that reaches a `TreeResponder` on the other side: in-process, over a socket, or inside
the delta stream; the messages are plain bytes, so the transport does not matter.

Messages (little-endian; indexes are LEB128 varints, each the gap from the previous one):
    HELLO    request  01                       reply 01 geometry root-digest
    CHILDREN request  02 level count indexes…  reply 02 children of each node, in order
    error    reply    FF utf-8 message
Children of a level-L node are the digests of its level L-1 children; children of a leaf are
the crc32c values (u32) of its blocks.

In-flight rule for live volumes: blocks the primary has written but the shadow has not yet
acknowledged are passed as `exclude`, read when the compare starts and again when it ends, so
blocks written meanwhile count too (the caller keeps a block excluded from its first write until
the shadow acknowledges it). Subtrees wholly excluded are not descended; a differing block that
is excluded is listed as `deferred`, never as a discrepancy. Every excluded block is re-checked
(`recheck`) once acknowledged, whether or not it was seen to differ.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from shadowblk.integrity.hash_tree import HashTree, TreeGeometry

HELLO = 0x01
CHILDREN = 0x02
ERROR = 0xFF
MAX_NODES_PER_REQUEST = 4096
_GEOMETRY = struct.Struct("<QIIIB")  # blocks, block size, fanout, leaf blocks, digest size

Send = Callable[[bytes], bytes]


class ProtocolError(ValueError):
    """A malformed request or reply: the message says what was wrong."""


class GeometryMismatch(ValueError):
    """The two trees are not over the same volume geometry: they cannot be compared."""


class Exclusion(Protocol):
    """Blocks to leave out of a comparison, as byte extents (a DirtyBitmap is one)."""

    def extents(self) -> Iterable[tuple[int, int]]: ...


@dataclass
class CompareResult:
    """Byte offsets of the differing blocks, and what finding them cost."""

    differing: list[int] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)
    peer_crcs: dict[int, int] = field(default_factory=dict)  # offset -> the peer's crc there
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trips: int = 0

    @property
    def bytes_exchanged(self) -> int:
        return self.bytes_sent + self.bytes_received


# --- encoding ---------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ProtocolError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ProtocolError("varint longer than 64 bits")


def encode_children(level: int, nodes: Sequence[int]) -> bytes:
    """A CHILDREN request for ascending, distinct `nodes` of `level`."""
    out = bytearray([CHILDREN, level])
    out += _varint(len(nodes))
    previous = -1
    for node in nodes:
        out += _varint(node - previous - 1)
        previous = node
    return bytes(out)


def _decode_children(request: bytes) -> tuple[int, list[int]]:
    if len(request) < 3:
        raise ProtocolError("CHILDREN request shorter than 3 bytes")
    level = request[1]
    count, pos = _read_varint(request, 2)
    if count > MAX_NODES_PER_REQUEST:
        raise ProtocolError(f"{count} nodes in one request, at most {MAX_NODES_PER_REQUEST}")
    nodes, previous = [], -1
    for _ in range(count):
        gap, pos = _read_varint(request, pos)
        previous += gap + 1
        nodes.append(previous)
    if pos != len(request):
        raise ProtocolError(f"{len(request) - pos} trailing bytes after the node list")
    return level, nodes


# --- the answering side -----------------------------------------------------------------------


class TreeResponder:
    """Answers HELLO and CHILDREN requests from its own tree; bad requests get an error reply."""

    def __init__(self, tree: HashTree) -> None:
        self.tree = tree

    def handle(self, request: bytes) -> bytes:
        try:
            return self._answer(request)
        except ProtocolError as exc:
            return bytes([ERROR]) + str(exc).encode()

    def _answer(self, request: bytes) -> bytes:
        if not request:
            raise ProtocolError("empty request")
        tree, g = self.tree, self.tree.geometry
        if request[0] == HELLO:
            if len(request) != 1:
                raise ProtocolError("HELLO takes no arguments")
            head = _GEOMETRY.pack(g.blocks, g.block_size, g.fanout, g.leaf_blocks, g.digest_size)
            return bytes([HELLO]) + head + tree.root
        if request[0] != CHILDREN:
            raise ProtocolError(f"unknown request type {request[0]:#04x}")
        level, nodes = _decode_children(request)
        if level >= tree.depth:
            raise ProtocolError(f"level {level} beyond the tree's {tree.depth} levels")
        if nodes and nodes[-1] >= g.level_sizes[level]:
            raise ProtocolError(f"node {nodes[-1]} beyond level {level}'s {g.level_sizes[level]}")
        return bytes([CHILDREN]) + b"".join(tree.children(level, n) for n in nodes)


# --- the asking side --------------------------------------------------------------------------


class _Link:
    """Sends requests, checks reply types, counts bytes and round trips into `result`."""

    def __init__(self, send: Send, result: CompareResult) -> None:
        self.send = send
        self.result = result

    def call(self, request: bytes) -> bytes:
        reply = self.send(request)
        self.result.bytes_sent += len(request)
        self.result.bytes_received += len(reply)
        self.result.round_trips += 1
        if not reply:
            raise ProtocolError("empty reply")
        if reply[0] == ERROR:
            raise ProtocolError(f"peer refused: {reply[1:].decode(errors='replace')}")
        if reply[0] != request[0]:
            raise ProtocolError(f"reply type {reply[0]:#04x} to request {request[0]:#04x}")
        return reply[1:]

    def hello(self, local: HashTree) -> bytes:
        """Check the peer's geometry against ours; return the peer's root digest."""
        reply = self.call(bytes([HELLO]))
        g = local.geometry
        if len(reply) != _GEOMETRY.size + g.digest_size:
            raise ProtocolError(f"HELLO reply of {len(reply)} bytes")
        try:
            theirs = TreeGeometry(*_GEOMETRY.unpack_from(reply))
        except ValueError as exc:
            raise ProtocolError(f"peer sent an impossible geometry: {exc}") from None
        if theirs != g:
            raise GeometryMismatch(f"peer tree {theirs} differs from ours {g}")
        return reply[_GEOMETRY.size :]


def _block_mask(exclude: Exclusion | None, g: TreeGeometry) -> np.ndarray:
    mask = np.zeros(g.blocks, dtype=bool)
    if exclude is not None:
        for offset, length in exclude.extents():
            mask[offset // g.block_size : -(-(offset + length) // g.block_size)] = True
    return mask


def compare(local: HashTree, send: Send, exclude: Exclusion | None = None) -> CompareResult:
    """Find every block whose crc differs between `local` and the peer behind `send`."""
    result = CompareResult()
    link = _Link(send, result)
    root = link.hello(local)
    frontier = [] if root == local.root else [0]
    return _descend(local, link, local.depth - 1, frontier, exclude)


def recheck(
    local: HashTree, send: Send, offsets: Iterable[int], exclude: Exclusion | None = None
) -> CompareResult:
    """Compare only the leaves holding `offsets` (e.g. blocks deferred by an earlier compare)."""
    result = CompareResult()
    link = _Link(send, result)
    link.hello(local)
    g = local.geometry
    leaves = sorted({off // g.block_size // g.leaf_blocks for off in offsets})
    return _descend(local, link, 0, leaves, exclude)


def _descend(
    local: HashTree, link: _Link, level: int, frontier: list[int], exclude: Exclusion | None
) -> CompareResult:
    g = local.geometry
    start_mask = _block_mask(exclude, g)
    excluded_before = np.concatenate(([0], np.cumsum(start_mask)))
    for lvl in range(level, -1, -1):
        frontier = [n for n in frontier if not _wholly_excluded(g, lvl, n, excluded_before)]
        below: list[int] = []
        for i in range(0, len(frontier), MAX_NODES_PER_REQUEST):
            batch = frontier[i : i + MAX_NODES_PER_REQUEST]
            reply = link.call(encode_children(lvl, batch))
            below += _differing_children(local, lvl, batch, reply, link.result.peer_crcs)
        frontier = below
    mask = start_mask | _block_mask(exclude, g)
    for block in frontier:
        (link.result.deferred if mask[block] else link.result.differing).append(
            block * g.block_size
        )
    return link.result


def _wholly_excluded(g: TreeGeometry, level: int, node: int, excluded_before: np.ndarray) -> bool:
    first, end = g.block_span(level, node)
    return int(excluded_before[end] - excluded_before[first]) == end - first


def _differing_children(
    local: HashTree, level: int, nodes: list[int], reply: bytes, peer_crcs: dict[int, int]
) -> list[int]:
    """Indexes of the children (nodes of level-1, or blocks) that differ, in order; for
    blocks, the peer's crc of each goes into PEER_CRCS (by byte offset)."""
    g = local.geometry
    width = 4 if level == 0 else g.digest_size
    out: list[int] = []
    pos = 0
    for node in nodes:
        first, end = g.child_span(level, node)
        size = (end - first) * width
        theirs = reply[pos : pos + size]
        if len(theirs) != size:
            raise ProtocolError(f"reply too short for the children of node {node}")
        pos += size
        ours = np.frombuffer(local.children(level, node), dtype=np.uint8).reshape(-1, width)
        rows = np.frombuffer(theirs, dtype=np.uint8).reshape(-1, width)
        differ = np.nonzero((ours != rows).any(axis=1))[0]
        out += (differ + first).tolist()
        if level == 0:
            crcs = np.frombuffer(theirs, dtype="<u4")
            for i in differ.tolist():
                peer_crcs[(first + i) * g.block_size] = int(crcs[i])
    if pos != len(reply):
        raise ProtocolError(f"{len(reply) - pos} unexpected bytes at the end of a reply")
    return out
