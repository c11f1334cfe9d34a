"""Bad input at the shadow port: garbage, a bad HMAC, replayed frames (in a session and from
another one), a replayed epoch, an older generation, a size change. Each gets a clear ERROR (or
a NACK), the image and state stay untouched, and the daemon keeps serving."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import zstandard

from shadowblk.delta.auth import Session
from shadowblk.delta.extents import encode_extent
from shadowblk.delta.frames import (
    FLAG_HMAC,
    HEADER_SIZE,
    TAG_SIZE,
    ErrorCode,
    Frame,
    FrameType,
    Hello,
    decode_header,
    pack_hello,
    unpack_error,
    unpack_nack,
    unpack_welcome,
    volume_key,
)
from shadowblk.delta.journal import committed_epoch
from shadowblk.delta.stream import encode
from tests.delta_driver import file_hash, make_key, shadow_state, start_shadow
from tests.procs import Processes

SIZE = 1 << 20
BS = 4096


class RawClient:
    """A hand-driven sender: every frame is built here, so any of them can be wrong."""

    def __init__(self, port: int, key: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.key = key
        self.session = Session(key, bytes(16))
        self.seq = 0
        self.sent: list[bytes] = []

    def hello(
        self, volume: str = "v1", size: int = SIZE, generation: int = 1, key: bytes | None = None
    ) -> Frame:
        nonce = os.urandom(16)
        hello = Hello(volume, size, BS, generation, 0, nonce)
        frame = Frame(FrameType.HELLO, volume_key(volume), generation, payload=pack_hello(hello))
        self.sock.sendall(encode(frame, Session(key or self.key, bytes(16))))
        self.session = Session(self.key, nonce)
        # a refusal of a HELLO that did not authenticate is signed for no session in particular
        reply = self.read(also=Session(self.key, bytes(16)))
        if reply.type is FrameType.WELCOME:
            self.session = Session(self.key, nonce, unpack_welcome(reply.payload).nonce)
        self.vol, self.gen = volume_key(volume), generation
        return reply

    def send(
        self, ftype: FrameType, epoch: int, offset: int = 0, length: int = 0, payload=b"", flags=0
    ):
        self.seq += 1
        frame = Frame(ftype, self.vol, self.gen, epoch, self.seq, offset, length, payload, flags)
        wire = encode(frame, self.session)
        self.sent.append(wire)
        self.sock.sendall(wire)

    def extent(self, epoch: int, offset: int, data: bytes) -> None:
        payload, flags = encode_extent(offset, data, BS, zstandard.ZstdCompressor())
        self.send(FrameType.EXTENT, epoch, offset, len(data), payload, flags)

    def read(self, also: Session | None = None) -> Frame:
        head = self._exact(HEADER_SIZE)
        frame, plen, _ = decode_header(head)
        payload = self._exact(plen)
        if frame.flags & FLAG_HMAC:
            tag = self._exact(TAG_SIZE)
            sessions = [self.session] if also is None else [self.session, also]
            assert any(x.verify(head, payload, tag) for x in sessions), "reply HMAC"
        return Frame(
            frame.type,
            frame.vol_key,
            frame.generation,
            frame.epoch,
            frame.seq,
            frame.offset,
            frame.length,
            payload,
        )

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def close(self) -> None:
        self.sock.close()


def error_of(frame: Frame) -> tuple[ErrorCode, str]:
    assert frame.type is FrameType.ERROR, frame.type
    code, reason = unpack_error(frame.payload)
    return ErrorCode(code), reason


@pytest.fixture
def shadow(tmp_path: Path, procs: Processes):
    """A shadow holding volume v1 at epoch 1 (generation 2), with known content."""
    key_path = make_key(tmp_path / "key")
    key = key_path.read_text().encode()
    proc, port = start_shadow(procs, tmp_path / "data", key_path, "shadow")
    c = RawClient(port, key)
    assert c.hello(generation=2).type is FrameType.WELCOME
    c.extent(1, 0, os.urandom(2 * BS))
    c.send(FrameType.EPOCH_END, 1)
    applied = c.read()
    assert (applied.type, applied.epoch) == (FrameType.EPOCH_APPLIED, 1)
    c.close()
    return proc, port, key, tmp_path / "data"


def checkpointed(data: Path, epoch: int) -> None:
    """Wait until the state file of v1 records EPOCH (the checkpoint after a stream ends)."""
    deadline = time.monotonic() + 30
    while shadow_state(data, "v1")["last_applied"] < epoch:
        assert time.monotonic() < deadline, shadow_state(data, "v1")
        time.sleep(0.02)


def untouched(data: Path, before: tuple[str, dict]) -> None:
    assert (file_hash(data / "v1.img"), shadow_state(data, "v1")) == before


def test_every_bad_input_is_refused_and_the_daemon_serves_on(shadow) -> None:
    proc, port, key, data = shadow
    before = (file_hash(data / "v1.img"), shadow_state(data, "v1"))

    # garbage instead of a HELLO
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(os.urandom(HEADER_SIZE))
    c = RawClient.__new__(RawClient)
    c.sock, c.session = s, Session(key, bytes(16))
    code, reason = error_of(c.read())
    assert code is ErrorCode.BAD_HEADER and "magic" in reason
    s.close()

    # a HELLO signed with another key
    c = RawClient(port, key)
    code, reason = error_of(c.hello(generation=2, key=b"not-the-key-" * 3))
    assert code is ErrorCode.AUTH and "HMAC" in reason
    c.close()

    # an older generation (while a legitimate stream is open: it must not end it)
    live = RawClient(port, key)
    assert live.hello(generation=2).type is FrameType.WELCOME
    c = RawClient(port, key)
    code, reason = error_of(c.hello(generation=1))
    assert code is ErrorCode.STALE_GENERATION and "generation 2" in reason
    c.close()
    live.send(FrameType.PING, 0)
    assert live.read().type is FrameType.PONG
    live.close()
    # a size change
    c = RawClient(port, key)
    code, reason = error_of(c.hello(size=2 * SIZE, generation=2))
    assert code is ErrorCode.VOLUME_MISMATCH and "refusing" in reason
    c.close()

    # a replayed epoch: epoch 1 is already applied
    c = RawClient(port, key)
    assert c.hello(generation=2).type is FrameType.WELCOME
    c.extent(1, 0, os.urandom(BS))
    code, reason = error_of(c.read())
    assert code is ErrorCode.REPLAY and "already applied" in reason
    c.close()

    # a frame replayed inside its session
    c = RawClient(port, key)
    assert c.hello(generation=2).type is FrameType.WELCOME
    c.extent(2, 0, os.urandom(BS))
    c.sock.sendall(c.sent[-1])
    code, reason = error_of(c.read())
    assert code is ErrorCode.REPLAY and "replayed" in reason
    c.close()

    # frames recorded on one session, replayed on another: their HMACs do not verify
    untouched(data, before)
    recorder = RawClient(port, key)
    assert recorder.hello(generation=2).type is FrameType.WELCOME
    recorder.extent(2, BS, os.urandom(BS))
    recorder.send(FrameType.EPOCH_END, 2)
    assert recorder.read().type is FrameType.EPOCH_APPLIED
    recorder.close()
    checkpointed(data, 2)  # acknowledged from the journal; the state file follows at stream end
    committed = (file_hash(data / "v1.img"), shadow_state(data, "v1"))
    replayer = RawClient(port, key)
    assert replayer.hello(generation=2).type is FrameType.WELCOME
    replayer.sock.sendall(b"".join(recorder.sent))
    nack = replayer.read()
    assert nack.type is FrameType.NACK
    _, ncode, reason = unpack_nack(nack.payload)
    assert ncode == ErrorCode.AUTH and "bad HMAC" in reason
    replayer.close()
    untouched(data, committed)

    # whatever the bad peers did, a correct stream is still served
    good = RawClient(port, key)
    assert good.hello(generation=2).type is FrameType.WELCOME
    good.extent(3, 3 * BS, b"\x5a" * BS)
    good.send(FrameType.EPOCH_END, 3)
    assert good.read().type is FrameType.EPOCH_APPLIED
    good.close()
    assert proc.poll() is None
    with open(data / "v1.img", "rb") as f:
        f.seek(3 * BS)
        assert f.read(BS) == b"\x5a" * BS


def test_bad_input_leaves_image_and_state_untouched(shadow) -> None:
    """Every refusal above, replayed against an idle shadow: byte for byte nothing changes."""
    proc, port, key, data = shadow
    before = (file_hash(data / "v1.img"), shadow_state(data, "v1"))
    for attempt in range(3):
        c = RawClient(port, key)
        if attempt == 0:
            error_of(c.hello(generation=1))
        elif attempt == 1:
            error_of(c.hello(size=2 * SIZE, generation=2))
        else:
            assert c.hello(generation=2).type is FrameType.WELCOME
            c.extent(5, 0, os.urandom(BS))
            c.extent(5, SIZE, os.urandom(BS))  # beyond the volume
            code, reason = error_of(c.read())
            assert code is ErrorCode.BAD_RANGE and "inside the volume" in reason
        c.close()
    untouched(data, before)
    assert committed_epoch(data / "v1.journal") is None
    assert proc.poll() is None


def test_unusable_volumes_are_refused_not_created_or_overwritten(
    shadow, procs: Processes, tmp_path: Path
) -> None:
    proc, port, key, data = shadow
    c = RawClient(port, key)
    code, reason = error_of(c.hello(volume="huge", size=1 << 62))  # beyond any file system
    assert code is ErrorCode.INTERNAL and "cannot create" in reason
    c.close()
    assert not (data / "huge.img").exists() and not (data / "huge.state").exists()
    # a state file that cannot be trusted: after a restart the volume is left alone
    procs.stop(proc)
    (data / "v1.state").write_text("{not json")
    image = file_hash(data / "v1.img")
    _, port = start_shadow(procs, data, tmp_path / "key", "shadow-again")
    c = RawClient(port, key)
    code, reason = error_of(c.hello(generation=2))
    assert code is ErrorCode.INTERNAL and "unreadable" in reason
    c.close()
    assert file_hash(data / "v1.img") == image
