"""The verify port's frames: a tag binds each frame to its key, connection, direction and place
in the sequence, so tampering, replay, reordering and reflection all fail."""

from __future__ import annotations

import os

import pytest

from shadowblk.integrity.tree_wire import (
    HEADER,
    MAX_REQUEST,
    REPLY,
    REQUEST,
    Channel,
    WireError,
    pack_greeting,
    unpack_greeting,
)

KEY = os.urandom(32)


def pair(key: bytes = KEY) -> tuple[Channel, Channel]:
    a, s = os.urandom(16), os.urandom(16)
    return Channel(KEY, a, s, sends=REQUEST), Channel(key, a, s, sends=REPLY)


def receive(channel: Channel, frame: bytes) -> bytes:
    header = frame[: HEADER.size]
    length = channel.payload_length(header, MAX_REQUEST)
    body = frame[HEADER.size :]
    return channel.accept(header, body[:length], body[length:])


def test_frames_pass_in_order() -> None:
    asker, shadow = pair()
    for i in range(3):
        assert receive(shadow, asker.pack(b"\x02req%d" % i)) == b"\x02req%d" % i
        assert receive(asker, shadow.pack(b"\x02rep%d" % i)) == b"\x02rep%d" % i


def test_tampered_frame_fails() -> None:
    asker, shadow = pair()
    frame = bytearray(asker.pack(b"\x01"))
    frame[HEADER.size] ^= 0x40
    with pytest.raises(WireError, match="authentication failed"):
        receive(shadow, bytes(frame))


def test_replay_and_reorder_fail() -> None:
    asker, shadow = pair()
    first, second = asker.pack(b"\x01"), asker.pack(b"\x01")
    with pytest.raises(WireError, match="sequence 1, expected 0"):
        receive(shadow, second)
    receive(shadow, first)
    with pytest.raises(WireError, match="sequence 0, expected 1"):
        receive(shadow, first)


def test_reflected_frame_fails() -> None:
    asker, _ = pair()
    with pytest.raises(WireError, match="direction"):
        receive(asker, asker.pack(b"\x01"))


def test_another_key_or_connection_fails() -> None:
    asker, shadow = pair(os.urandom(32))
    with pytest.raises(WireError, match="authentication failed"):
        receive(shadow, asker.pack(b"\x01"))
    other_asker, _ = pair()
    _, fresh_shadow = pair()
    with pytest.raises(WireError, match="authentication failed"):
        receive(fresh_shadow, other_asker.pack(b"\x01"))


def test_greeting_checks() -> None:
    g = unpack_greeting(pack_greeting(b"n" * 16, True))
    assert (g.status, g.flags, g.nonce) == (0, 1, b"n" * 16)
    with pytest.raises(WireError, match="not a shadowblk verify peer"):
        unpack_greeting(b"X" * len(pack_greeting(b"n" * 16, True)))
