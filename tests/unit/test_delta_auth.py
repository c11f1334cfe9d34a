"""Frame tags: Poly1305 matches RFC 8439, and a tag binds key, session, header and payload."""

from __future__ import annotations

import os

import pytest

from shadowblk.delta.auth import POLY_MIN, Session
from shadowblk.delta.frames import TAG_SIZE
from shadowblk.delta.poly1305 import poly1305

KEY = b"k" * 32
HEADER = bytes(range(72))


def test_poly1305_rfc8439_vector() -> None:
    key = bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
    tag = poly1305(key, b"Cryptographic Forum Research Group")
    assert tag.hex() == "a8061dc1305136c6c22b8baf0c0127a9"
    with pytest.raises(ValueError):
        poly1305(key[:16], b"x")


@pytest.mark.parametrize("size", [0, 100, POLY_MIN - 1, POLY_MIN, 1 << 20])
def test_tag_binds_everything(size: int) -> None:
    payload = os.urandom(size)
    session = Session(KEY, b"a" * 16, b"b" * 16)
    tag = session.tag(HEADER, payload)
    assert len(tag) == TAG_SIZE
    assert session.verify(HEADER, payload, tag)
    assert Session(KEY, b"a" * 16, b"b" * 16).verify(HEADER, payload, tag)  # deterministic
    assert not Session(b"K" * 32, b"a" * 16, b"b" * 16).verify(HEADER, payload, tag)
    assert not Session(KEY, b"a" * 16, b"c" * 16).verify(HEADER, payload, tag)
    other_header = HEADER[:-1] + b"\xff"
    assert not session.verify(other_header, payload, tag)
    if size:
        damaged = bytearray(payload)
        damaged[size // 2] ^= 1
        assert not session.verify(HEADER, bytes(damaged), tag)
    assert not session.verify(HEADER, payload, tag[:-1])
