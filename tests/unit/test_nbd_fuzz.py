"""Hypothesis throws random handshakes and random request streams at a live server. After every
example: the server still answers a client that stayed connected throughout, a new client can
connect, and the volume and the dirty bitmap are untouched (no generated request may change
data: their commands are non-mutating, or their ranges or flags are invalid)."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowblk.nbd import protocol as P
from shadowblk.nbd.backend import Backend
from shadowblk.nbd.client import NBDClient
from shadowblk.nbd.handshake import Export
from shadowblk.nbd.server import NBDServer
from shadowblk.tracking.tracker import WriteTracker

SIZE = 1 << 20
PATTERN = bytes(range(256)) * (SIZE // 256)


class Live:
    def __init__(self, tmp: Path) -> None:
        self.image = tmp / "vol.img"
        self.image.write_bytes(PATTERN)
        backend = Backend.open(self.image, None, False)
        self.tracker = WriteTracker(tmp / "state", SIZE, save_interval=3600)
        self.server = NBDServer(Export("vol", backend), "127.0.0.1", 0, tracker=self.tracker)
        self.thread = threading.Thread(target=self.server.serve_forever)
        self.thread.start()
        self.witness = NBDClient("127.0.0.1", self.server.port, "vol", structured=True)

    def check(self) -> None:
        assert hashlib.sha256(self.image.read_bytes()).digest() == DIGEST
        assert self.tracker.bitmap.count() == 0
        assert self.witness.pread(4096, 256) == PATTERN[4096 : 4096 + 256]
        with NBDClient("127.0.0.1", self.server.port, "vol") as fresh:
            assert fresh.pread(SIZE - 16, 16) == PATTERN[-16:]

    def close(self) -> None:
        self.witness.close()
        self.server.stop()
        self.thread.join(30)


DIGEST = hashlib.sha256(PATTERN).digest()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    server = Live(tmp_path_factory.mktemp("fuzz"))
    try:
        yield server
    finally:
        server.close()


def exchange(port: int, data: bytes, after_greeting: bool = True) -> None:
    """Send DATA, then read whatever comes back until the server stops talking or hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(0.3)
        try:
            if after_greeting:
                sock.recv(18)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # the client vanishes after its bytes
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass  # the server hung up or stopped talking: both are fine answers


option = st.builds(
    lambda magic, opt, data, lie: P.OPTION_HEADER.pack(magic, opt, max(0, len(data) + lie)) + data,
    st.sampled_from([P.IHAVEOPT] * 6 + [0, 0x49484156454F5055]),
    st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)),
    st.binary(max_size=64),
    st.sampled_from([0, 0, 0, -1, 1, 1000, 2**31]),
)
handshake = st.builds(
    lambda flags, opts, tail: P.CLIENT_FLAGS.pack(flags) + b"".join(opts) + tail,
    st.sampled_from([1, 3, 0, 2, 4, 0xFFFFFFFF]),
    st.lists(option, max_size=6),
    st.binary(max_size=32),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(handshake)
def test_fuzz_handshake(live: Live, data: bytes) -> None:
    exchange(live.server.port, data)
    live.check()


def go_prefix(structured: bool) -> bytes:
    """A well-formed handshake up to the transmission phase, sent blind."""
    opts = b""
    if structured:
        opts += P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_STRUCTURED_REPLY, 0)
    name = b"vol"
    go = P.U32.pack(len(name)) + name + b"\0\0"
    opts += P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(go)) + go
    return P.CLIENT_FLAGS.pack(3) + opts


def harmless_request(draw: st.DrawFn, last: bool = False) -> bytes:
    """A request that must not change the volume: a non-mutating command, or a mutating one
    that is out of range or flagged wrongly; the LAST one may also be cut short (anywhere
    else the bytes after it would complete it)."""
    magic = draw(st.sampled_from([P.REQUEST_MAGIC] * 8 + [0, 0x67446698]))
    cookie = draw(st.integers(0, 2**64 - 1))
    kinds = ["read-ish", "bad-range", "bad-flags", "garbage"] + (["truncated"] * 2 if last else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "read-ish":
        cmd = draw(
            st.sampled_from(
                [P.CMD_READ, P.CMD_FLUSH, P.CMD_CACHE, P.CMD_BLOCK_STATUS, 8, 9, 255, 65535]
            )
        )
        offset = draw(st.one_of(st.integers(0, SIZE), st.integers(0, 2**64 - 1)))
        length = draw(st.one_of(st.integers(0, 65536), st.integers(0, 2**32 - 1)))
        flags = draw(st.integers(0, 0xFFFF))
        return P.REQUEST.pack(magic, flags, cmd, cookie, offset, length)
    cmd = draw(st.sampled_from([P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES]))
    length = draw(st.integers(1, 8192))
    if kind == "bad-range":
        offset = draw(st.integers(SIZE - length + 1, 2**64 - 1))
        flags = draw(st.sampled_from([0, P.CMD_FLAG_FUA]))
    else:
        offset = draw(st.integers(0, SIZE - length))
        flags = (
            0 if kind == "truncated" else draw(st.sampled_from([0x20, 0x40, 0x8000, P.CMD_FLAG_DF]))
        )
    payload = draw(st.binary(min_size=length, max_size=length)) if cmd == P.CMD_WRITE else b""
    if kind == "truncated":
        if cmd != P.CMD_WRITE:
            return P.REQUEST.pack(magic, flags, cmd, cookie, offset, length)[:20]
        return P.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload[: length // 2]
    return P.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.booleans(),
    st.lists(st.composite(harmless_request)(), max_size=12),
    st.composite(harmless_request)(last=True),
)
def test_fuzz_requests(live: Live, structured: bool, requests: list[bytes], last: bytes) -> None:
    exchange(live.server.port, go_prefix(structured) + b"".join(requests) + last)
    live.check()
