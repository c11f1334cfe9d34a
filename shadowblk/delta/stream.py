"""Frames over an asyncio stream: one reader and one writer per connection, both checking auth.

Reading verifies, in order: header crc (fatal: framing lost), payload length, HMAC tag, payload
crc (both NACKable: the frame is whole but its bytes are not the ones the sender wrote).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import crc32c

from shadowblk.delta.auth import Session
from shadowblk.delta.frames import (
    FLAG_HMAC,
    HEADER_SIZE,
    TAG_SIZE,
    ErrorCode,
    Frame,
    FrameError,
    decode_header,
    encode_header,
)


def encode(frame: Frame, session: Session) -> bytes:
    """The bytes of FRAME on the wire, tagged when the session has a key."""
    flags = frame.flags | (FLAG_HMAC if session.key is not None else 0)
    head = encode_header(frame, flags)
    if session.key is None:
        return head + frame.payload
    return head + frame.payload + session.tag(head, frame.payload)


@dataclass(frozen=True)
class RawFrame:
    """A frame as read, before its tag and payload crc are checked."""

    head: bytes
    frame: Frame  # without payload
    payload_crc: int
    payload: bytes
    tag: bytes


async def read_raw(reader: asyncio.StreamReader) -> RawFrame:
    """The next frame's bytes, header checked. EOF mid-frame raises IncompleteReadError."""
    head = await reader.readexactly(HEADER_SIZE)
    frame, plen, pcrc = decode_header(head)
    payload = await reader.readexactly(plen) if plen else b""
    tag = await reader.readexactly(TAG_SIZE) if frame.flags & FLAG_HMAC else b""
    return RawFrame(head, frame, pcrc, payload, tag)


def check(raw: RawFrame, session: Session) -> Frame:
    """The frame of RAW once its tag and payload crc passed (CPU-bound on big frames, and the
    hashes release the GIL: callers may run it in a worker thread)."""
    frame, payload = raw.frame, raw.payload
    if session.key is not None:
        if not frame.flags & FLAG_HMAC:
            raise FrameError(ErrorCode.AUTH, "frame without an HMAC tag; this peer requires one")
        if not session.verify(raw.head, payload, raw.tag):
            raise FrameError(
                ErrorCode.AUTH,
                f"bad HMAC on {frame.type.name} seq {frame.seq}",
                fatal=False,
                seq=frame.seq,
            )
    if crc32c.crc32c(payload) != raw.payload_crc:
        raise FrameError(
            ErrorCode.BAD_PAYLOAD,
            f"payload checksum mismatch on {frame.type.name} seq {frame.seq}",
            fatal=False,
            seq=frame.seq,
        )
    return replace(frame, payload=payload, flags=frame.flags & ~FLAG_HMAC)


async def read_frame(reader: asyncio.StreamReader, session: Session) -> Frame:
    """The next frame, every check passed. EOF mid-frame raises asyncio.IncompleteReadError."""
    return check(await read_raw(reader), session)
