"""Frames over an asyncio stream: one reader and one writer per connection, both checking auth.

Reading verifies, in order: header crc (fatal: framing lost), payload length, HMAC tag, payload
crc (both NACKable: the frame is whole but its bytes are not the ones the sender wrote).
"""

from __future__ import annotations

import asyncio

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


async def read_frame(reader: asyncio.StreamReader, session: Session) -> Frame:
    """The next frame, every check passed. EOF mid-frame raises asyncio.IncompleteReadError."""
    head = await reader.readexactly(HEADER_SIZE)
    frame, plen, pcrc = decode_header(head)
    payload = await reader.readexactly(plen) if plen else b""
    tagged = bool(frame.flags & FLAG_HMAC)
    tag = await reader.readexactly(TAG_SIZE) if tagged else b""
    if session.key is not None:
        if not tagged:
            raise FrameError(ErrorCode.AUTH, "frame without an HMAC tag; this peer requires one")
        if not session.verify(head, payload, tag):
            raise FrameError(
                ErrorCode.AUTH,
                f"bad HMAC on {frame.type.name} seq {frame.seq}",
                fatal=False,
                seq=frame.seq,
            )
    if crc32c.crc32c(payload) != pcrc:
        raise FrameError(
            ErrorCode.BAD_PAYLOAD,
            f"payload checksum mismatch on {frame.type.name} seq {frame.seq}",
            fatal=False,
            seq=frame.seq,
        )
    return Frame(
        frame.type,
        frame.vol_key,
        frame.generation,
        frame.epoch,
        frame.seq,
        frame.offset,
        frame.length,
        payload,
        frame.flags & ~FLAG_HMAC,
    )
