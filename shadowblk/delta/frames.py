"""The delta stream's frames: a fixed 72-byte header, a payload, and an optional HMAC tag.

Byte layout and semantics are in docs/protocol.md. Everything here is pure (bytes in, bytes
out) so the server, the shipper and the tests share one definition of the wire.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

import crc32c

MAGIC = b"SBDS"
VERSION = 3  # 3: EXTENT frames carry an extent list (2: one run; 1: 32-byte HMAC-SHA256 tags)
HEADER = struct.Struct("!4sBBHQQQQQQIII")  # ... payload_len, payload_crc, reserved (+ header crc)
HEADER_SIZE = HEADER.size + 4
TAG_SIZE = 16
NONCE_SIZE = 16
MAX_PAYLOAD = 4 << 20
MAX_EXTENT = 1 << 20  # uncompressed data bytes of one EXTENT frame (all its extents)

FLAG_HMAC = 0x0001  # a 16-byte tag (BLAKE2b or Poly1305, see auth.py) follows the payload
FLAG_MERGE = 0x0002  # EPOCH_END: staged, but commit together with the next epoch
FLAG_RAW = 0x0004  # EXTENT: the data is stored as it is, not in a zstd frame


class FrameType(IntEnum):
    HELLO = 1
    WELCOME = 2
    EXTENT = 3
    ZERO = 4
    TRIM = 5
    EPOCH_END = 6
    EPOCH_APPLIED = 7
    NACK = 8
    ERROR = 9
    PING = 10
    PONG = 11
    STAGED = 12


class ErrorCode(IntEnum):
    """Why a peer refuses a stream (ERROR) or one frame (NACK)."""

    BAD_HEADER = 1
    AUTH = 2
    VERSION = 3
    VOLUME_MISMATCH = 4
    STALE_GENERATION = 5
    REPLAY = 6
    EPOCH_ORDER = 7
    BAD_PAYLOAD = 8
    BAD_RANGE = 9
    PROTOCOL = 10
    TOO_MANY_NACKS = 11
    INTERNAL = 12


class FrameError(Exception):
    """A frame that must not be used. `fatal` errors end the stream (the framing itself can no
    longer be trusted); the others are NACKed so the sender re-sends from that sequence."""

    def __init__(
        self, code: ErrorCode, message: str, fatal: bool = True, seq: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal
        self.seq = seq


@dataclass(frozen=True)
class Frame:
    type: FrameType
    vol_key: int = 0
    generation: int = 0
    epoch: int = 0
    seq: int = 0
    offset: int = 0
    length: int = 0
    payload: bytes = b""
    flags: int = 0


def volume_key(volume_id: str) -> int:
    """The 64-bit tag every frame carries to name its volume (first 8 bytes of SHA-256)."""
    return int.from_bytes(hashlib.sha256(volume_id.encode()).digest()[:8], "big")


def encode_header(frame: Frame, flags: int) -> bytes:
    head = HEADER.pack(
        MAGIC,
        VERSION,
        int(frame.type),
        flags,
        frame.vol_key,
        frame.generation,
        frame.epoch,
        frame.seq,
        frame.offset,
        frame.length,
        len(frame.payload),
        crc32c.crc32c(frame.payload),
        0,
    )
    return head + struct.pack("!I", crc32c.crc32c(head))


def decode_header(head: bytes) -> tuple[Frame, int, int]:
    """(frame without payload, flags, payload crc) of a checked header; fatal FrameError if bad."""
    if len(head) != HEADER_SIZE:
        raise FrameError(ErrorCode.BAD_HEADER, f"short header: {len(head)} bytes")
    (stored,) = struct.unpack_from("!I", head, HEADER.size)
    if head[:4] != MAGIC:
        raise FrameError(ErrorCode.BAD_HEADER, f"bad magic {head[:4]!r}: not a shadowblk stream")
    if crc32c.crc32c(head[: HEADER.size]) != stored:
        raise FrameError(ErrorCode.BAD_HEADER, "header checksum mismatch")
    (_, version, ftype, flags, vol_key, gen, epoch, seq, offset, length, plen, pcrc, _) = (
        HEADER.unpack_from(head)
    )
    if version != VERSION:
        raise FrameError(
            ErrorCode.VERSION, f"protocol version {version}, this peer speaks {VERSION}"
        )
    try:
        kind = FrameType(ftype)
    except ValueError:
        raise FrameError(ErrorCode.PROTOCOL, f"unknown frame type {ftype}") from None
    if plen > MAX_PAYLOAD:
        raise FrameError(ErrorCode.BAD_HEADER, f"payload of {plen} bytes exceeds {MAX_PAYLOAD}")
    frame = Frame(kind, vol_key, gen, epoch, seq, offset, length, b"", flags)
    return frame, plen, pcrc


# --- payloads of the control frames --------------------------------------------------------

_HELLO = struct.Struct("!HHQIQQ16sH")
_WELCOME = struct.Struct("!16sHQQQI")
_NACK = struct.Struct("!QH")
_ERROR = struct.Struct("!H")
MAX_VOLUME_ID = 64


@dataclass(frozen=True)
class Hello:
    volume_id: str
    size: int
    block_size: int
    generation: int
    acked_epoch: int  # the sender's view of the last epoch this shadow acknowledged (0: none)
    nonce: bytes
    flags: int = 0


@dataclass(frozen=True)
class Welcome:
    nonce: bytes
    known: bool  # the shadow holds state for this volume
    last_applied: int  # 0: no epoch applied yet
    generation: int
    size: int
    block_size: int


def pack_hello(h: Hello) -> bytes:
    vid = h.volume_id.encode()
    head = _HELLO.pack(
        VERSION, h.flags, h.size, h.block_size, h.generation, h.acked_epoch, h.nonce, len(vid)
    )
    return head + vid


def unpack_hello(payload: bytes) -> Hello:
    if len(payload) < _HELLO.size:
        raise FrameError(ErrorCode.PROTOCOL, "HELLO payload too short")
    version, flags, size, bs, gen, acked, nonce, vlen = _HELLO.unpack_from(payload)
    if version != VERSION:
        raise FrameError(
            ErrorCode.VERSION, f"HELLO for protocol {version}, this peer speaks {VERSION}"
        )
    raw = payload[_HELLO.size :]
    if len(raw) != vlen or not 0 < vlen <= MAX_VOLUME_ID:
        raise FrameError(ErrorCode.PROTOCOL, "HELLO volume id length is wrong")
    try:
        vid = raw.decode()
    except UnicodeDecodeError:
        raise FrameError(ErrorCode.PROTOCOL, "HELLO volume id is not UTF-8") from None
    return Hello(vid, size, bs, gen, acked, nonce, flags)


def pack_welcome(w: Welcome) -> bytes:
    return _WELCOME.pack(w.nonce, int(w.known), w.last_applied, w.generation, w.size, w.block_size)


def unpack_welcome(payload: bytes) -> Welcome:
    if len(payload) != _WELCOME.size:
        raise FrameError(ErrorCode.PROTOCOL, "WELCOME payload has the wrong size")
    nonce, known, applied, gen, size, bs = _WELCOME.unpack(payload)
    return Welcome(nonce, bool(known), applied, gen, size, bs)


def pack_nack(seq: int, code: ErrorCode, reason: str) -> bytes:
    return _NACK.pack(seq, int(code)) + reason.encode()[:1000]


def unpack_nack(payload: bytes) -> tuple[int, int, str]:
    if len(payload) < _NACK.size:
        raise FrameError(ErrorCode.PROTOCOL, "NACK payload too short")
    seq, code = _NACK.unpack_from(payload)
    return seq, code, payload[_NACK.size :].decode(errors="replace")


def pack_error(code: ErrorCode, reason: str) -> bytes:
    return _ERROR.pack(int(code)) + reason.encode()[:1000]


def unpack_error(payload: bytes) -> tuple[int, str]:
    if len(payload) < _ERROR.size:
        return int(ErrorCode.PROTOCOL), "ERROR payload too short"
    (code,) = _ERROR.unpack_from(payload)
    return code, payload[_ERROR.size :].decode(errors="replace")
