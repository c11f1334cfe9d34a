"""The verify port's wire format: a greeting each way, then tagged request/reply frames that
carry the tree-compare messages (docs/integrity.md, "The verify port, byte by byte").

Authentication is the delta stream's: mutual TLS and/or the shared key. With the key every
frame carries a 16-byte tag from `shadowblk.delta.auth.Session`, over a key derived for this
port only (a delta frame can never pass for a verify frame or the reverse) and over both
peers' fresh nonces (a frame recorded on one connection is worthless on another); the header
holds the direction and a per-direction sequence number, so a frame cannot be replayed,
reordered or reflected inside a connection either.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shadowblk.delta.auth import Session, derive
from shadowblk.delta.frames import NONCE_SIZE, TAG_SIZE

MAGIC = b"SHBLKVFY"
VERSION = 1
FLAG_TAGGED = 0x01  # frames carry a tag under the shared key

GREETING = struct.Struct(f"<8sBBBB{NONCE_SIZE}s")  # magic version status flags reserved nonce
STATUS_OK = 0
STATUS_REFUSED = 1
REFUSAL = struct.Struct("<H")  # after a refused greeting: message length, then UTF-8 bytes

HEADER = struct.Struct("<IBQ")  # payload length, direction, sequence number
REQUEST = 0x51  # 'Q': asker to shadow
REPLY = 0x52  # 'R': shadow to asker
MAX_REQUEST = 64 << 10
MAX_REPLY = 2 << 20  # 4,096 leaves of 64 crcs is 1 MiB

# requests and replies beyond tree_compare's HELLO (01), CHILDREN (02) and error (FF)
OPEN = 0x10  # request: 10 volume-id (UTF-8); reply: 10 u64 map epoch, u8 map clean
OPEN_REPLY = struct.Struct("<QB")
READ = 0x11  # request: 11 u64 offset u32 length; reply: 11 the bytes (each block checked)
READ_REQUEST = struct.Struct("<QI")
MAX_READ = 1 << 20
SCAN = 0x12  # request: 12 u64 rate (bytes/s, 0 unlimited); reply: 12 u8 complete u32 count,
SCAN_REQUEST = struct.Struct("<Q")  # then per bad block: u64 block, u32 data crc, u32 map crc
SCAN_REPLY = struct.Struct("<BI")
SCAN_ENTRY = struct.Struct("<QII")
MAX_SCAN_ENTRIES = 65536  # 1 MiB of entries


class WireError(Exception):
    """The peer broke the protocol or failed authentication: the connection must end."""


@dataclass(frozen=True)
class Greeting:
    status: int
    flags: int
    nonce: bytes


def pack_greeting(nonce: bytes, tagged: bool, status: int = STATUS_OK) -> bytes:
    return GREETING.pack(MAGIC, VERSION, status, FLAG_TAGGED if tagged else 0, 0, nonce)


def pack_refusal(message: str) -> bytes:
    body = message.encode()[:4096]
    return pack_greeting(bytes(NONCE_SIZE), False, STATUS_REFUSED) + REFUSAL.pack(len(body)) + body


def unpack_greeting(raw: bytes) -> Greeting:
    magic, version, status, flags, _, nonce = GREETING.unpack(raw)
    if magic != MAGIC:
        raise WireError(f"not a shadowblk verify peer (got {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise WireError(f"verify protocol version {version}, this side speaks {VERSION}")
    if status not in (STATUS_OK, STATUS_REFUSED) or flags & ~FLAG_TAGGED:
        raise WireError(f"bad greeting: status {status}, flags {flags:#x}")
    return Greeting(status, flags, nonce)


class Channel:
    """Frames one connection's messages: sequence numbers per direction, tags under the key."""

    def __init__(
        self, key: bytes | None, client_nonce: bytes, server_nonce: bytes, sends: int
    ) -> None:
        self.session = Session(derive(key, b"verify"), client_nonce, server_nonce) if key else None
        self.sends = sends  # REQUEST for the asker, REPLY for the shadow
        self.receives = REPLY if sends == REQUEST else REQUEST
        self.out_seq = 0
        self.in_seq = 0

    @property
    def tag_size(self) -> int:
        return TAG_SIZE if self.session else 0

    def pack(self, payload: bytes) -> bytes:
        header = HEADER.pack(len(payload), self.sends, self.out_seq)
        self.out_seq += 1
        tag = self.session.tag(header, payload) if self.session else b""
        return header + payload + tag

    def payload_length(self, header: bytes, limit: int) -> int:
        """Check a received header; the payload length it announces."""
        length, direction, seq = HEADER.unpack(header)
        if direction != self.receives:
            raise WireError(f"frame direction {direction:#04x}, expected {self.receives:#04x}")
        if seq != self.in_seq:
            raise WireError(f"frame sequence {seq}, expected {self.in_seq}")
        if length > limit:
            raise WireError(f"frame of {length} bytes, at most {limit}")
        return length

    def accept(self, header: bytes, payload: bytes, tag: bytes) -> bytes:
        """Authenticate a received frame (its header already checked); returns its payload."""
        if self.session and not self.session.verify(header, payload, tag):
            raise WireError("authentication failed: bad frame tag (not the same key?)")
        self.in_seq += 1
        return payload
