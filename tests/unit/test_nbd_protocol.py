"""The server's answers to every option and command, good and bad, over real sockets to an
in-process server (Cython transmission loop and the Python handler behind it)."""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shadowblk.nbd import protocol as P
from shadowblk.nbd.backend import Backend
from shadowblk.nbd.client import NBDClient, NBDError
from shadowblk.nbd.handshake import Export
from shadowblk.nbd.server import NBDServer
from shadowblk.tracking.tracker import WriteTracker

MiB = 1 << 20
SIZE = 4 * MiB


@dataclass
class Running:
    server: NBDServer
    tracker: WriteTracker
    image: Path

    def client(self, **kw: object) -> NBDClient:
        return NBDClient("127.0.0.1", self.server.port, "vol", **kw)  # type: ignore[arg-type]

    def digest(self) -> str:
        return hashlib.sha256(self.image.read_bytes()).hexdigest()


def start(
    tmp_path: Path, native: bool = True, read_only: bool = False
) -> tuple[Running, threading.Thread]:
    image = tmp_path / "vol.img"
    if not image.exists():
        image.write_bytes(bytes(range(256)) * (SIZE // 256))
    backend = Backend.open(image, None, read_only)
    tracker = WriteTracker(tmp_path / "state", backend.size, save_interval=3600)
    server = NBDServer(Export("vol", backend), "127.0.0.1", 0, tracker=tracker, native=native)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    return Running(server, tracker, image), thread


@pytest.fixture(params=[True, False], ids=["native", "python"])
def srv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Running]:
    running, thread = start(tmp_path, native=request.param)
    try:
        yield running
    finally:
        running.server.stop()
        thread.join(30)


def raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = recv_exact(sock, 18)
    assert P.SERVER_GREETING.unpack(greeting)[:2] == (P.NBDMAGIC, P.IHAVEOPT)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def closed(sock: socket.socket) -> bool:
    """Whether the server hung up on SOCK (reads end of stream)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


# --- handshake ------------------------------------------------------------------------------


def test_options_and_errors(srv: Running) -> None:
    sock = raw_connect(srv.server.port)
    sock.sendall(P.CLIENT_FLAGS.pack(P.CLIENT_FLAG_FIXED_NEWSTYLE))

    def option(opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, o, rtype, length = P.OPTION_REPLY.unpack(recv_exact(sock, 20))
            assert (magic, o) == (P.OPT_REPLY_MAGIC, opt)
            out.append((rtype, recv_exact(sock, length)))
            if rtype in (P.REP_ACK,) or rtype & (1 << 31):
                return out

    assert option(99)[-1][0] == P.REP_ERR_UNSUP
    assert option(P.OPT_STARTTLS)[-1][0] == P.REP_ERR_POLICY  # no TLS configured
    assert option(P.OPT_LIST, b"x")[-1][0] == P.REP_ERR_INVALID
    listing = option(P.OPT_LIST)
    assert listing[0] == (P.REP_SERVER, struct.pack(">I", 3) + b"vol")
    assert option(P.OPT_INFO, b"\0\0")[-1][0] == P.REP_ERR_INVALID  # too short
    assert option(P.OPT_INFO, struct.pack(">I", 50) + b"vol\0\0")[-1][0] == P.REP_ERR_INVALID
    assert option(P.OPT_INFO, struct.pack(">I", 4) + b"nope\0\0")[-1][0] == P.REP_ERR_UNKNOWN
    info = option(
        P.OPT_INFO, struct.pack(">I", 3) + b"vol" + struct.pack(">HH", 1, P.INFO_BLOCK_SIZE)
    )
    assert info[-1][0] == P.REP_ACK
    payloads = {struct.unpack_from(">H", d)[0]: d for t, d in info if t == P.REP_INFO}
    _, size, flags = P.INFO_EXPORT_DATA.unpack(payloads[P.INFO_EXPORT])
    assert size == SIZE and flags & P.TFLAG_CAN_MULTI_CONN and not flags & P.TFLAG_SEND_DF
    assert P.INFO_BLOCK_SIZE_DATA.unpack(payloads[P.INFO_BLOCK_SIZE])[1:] == (1, 4096, 32 * MiB)
    meta = struct.pack(">I", 3) + b"vol" + struct.pack(">I", 1) + struct.pack(">I", 15)
    meta += b"base:allocation"
    assert option(P.OPT_SET_META_CONTEXT, meta)[-1][0] == P.REP_ERR_INVALID  # structured first
    assert option(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
    assert option(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ERR_INVALID  # twice
    listed = option(P.OPT_LIST_META_CONTEXT, struct.pack(">II", 3, 0)[:4] + b"vol" + b"\0\0\0\0")
    assert listed[0] == (P.REP_META_CONTEXT, b"\0\0\0\0base:allocation")
    chosen = option(P.OPT_SET_META_CONTEXT, meta)
    assert chosen[0] == (
        P.REP_META_CONTEXT,
        struct.pack(">I", P.META_ALLOCATION_ID) + b"base:allocation",
    )
    assert option(P.OPT_SET_META_CONTEXT, meta[:-3])[-1][0] == P.REP_ERR_INVALID  # truncated
    assert option(P.OPT_ABORT)[-1][0] == P.REP_ACK
    assert closed(sock)


@pytest.mark.parametrize(
    "payload",
    [
        b"\0\0\0\x04",  # unknown client flags: must hang up
        P.CLIENT_FLAGS.pack(1) + b"NOTMAGIC" + bytes(8),  # bad option magic
        P.CLIENT_FLAGS.pack(1) + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 1 << 30),  # huge
        P.CLIENT_FLAGS.pack(1) + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 4) + b"nope",
        P.CLIENT_FLAGS.pack(1) + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 100) + b"short",
    ],
    ids=["client-flags", "option-magic", "option-too-long", "unknown-export", "vanishes"],
)
def test_hostile_handshakes_drop_only_that_client(srv: Running, payload: bytes) -> None:
    with srv.client() as good:
        sock = raw_connect(srv.server.port)
        sock.sendall(payload)
        if payload.endswith(b"short"):
            sock.close()  # gone mid-option
        else:
            assert closed(sock)
        assert good.pread(0, 256) == bytes(range(256))
    with srv.client() as again:
        assert again.pread(SIZE - 256, 256) == bytes(range(256))


def test_export_name_and_no_zeroes(srv: Running) -> None:
    for client_flags, tail in [(1, 124), (3, 0)]:
        sock = raw_connect(srv.server.port)
        sock.sendall(P.CLIENT_FLAGS.pack(client_flags) + P.OPTION_HEADER.pack(P.IHAVEOPT, 1, 0))
        size, flags = P.EXPORT_NAME_REPLY.unpack(recv_exact(sock, 10))
        assert size == SIZE and flags & P.TFLAG_HAS_FLAGS
        assert recv_exact(sock, tail) == bytes(tail)
        sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 7, 0, 4))
        assert recv_exact(sock, 20) == P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, 7) + b"\0\1\2\3"
        sock.close()


# --- transmission ---------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_commands_and_error_codes(srv: Running, structured: bool) -> None:
    before = srv.digest()
    with srv.client(structured=structured) as c:
        cases = [
            (P.CMD_READ, SIZE - 512, 1024, 0, P.EINVAL),
            (P.CMD_READ, 0, 33 * MiB, 0, P.EOVERFLOW if structured else P.EINVAL),
            (P.CMD_READ, 0, 512, 0x40, P.EINVAL),  # unknown flag
            (P.CMD_WRITE, SIZE - 512, 1024, 0, P.ENOSPC),
            (P.CMD_WRITE, 0, 512, P.CMD_FLAG_NO_HOLE, P.EINVAL),
            (P.CMD_TRIM, SIZE, 4096, 0, P.EINVAL),
            (P.CMD_WRITE_ZEROES, (1 << 64) - 512, 1024, 0, P.ENOSPC),
            (P.CMD_CACHE, SIZE, 1, 0, P.EINVAL),
            (P.CMD_BLOCK_STATUS, 0, 4096, 0, P.EINVAL),  # no meta context
            (42, 0, 0, 0, P.EINVAL),
        ]
        for cmd, offset, length, flags, error in cases:
            payload = bytes(length) if cmd == P.CMD_WRITE else b""
            cookie = c.request(cmd, offset, length, flags, payload)
            reply = c.reply()
            assert (reply.cookie, reply.error, reply.data) == (cookie, error, b""), (cmd, offset)
        assert c.pread(0, 8) == bytes(range(8))  # still in sync
    assert srv.digest() == before and srv.tracker.bitmap.count() == 0

    with srv.client(structured=structured) as c:
        c.pwrite(b"\xee" * 4096, 8192, fua=True)
        c.zero(65536, 65536)
        c.zero(3 * MiB, 4096, P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FUA)
        c.trim(MiB, MiB)
        c.flush()
        assert c.pread(8192, 4096) == b"\xee" * 4096
        assert c.pread(65536, 65536) == bytes(65536)
        assert c.pread(MiB, 4096) == bytes(4096)  # a punched hole reads as zeroes
        c._call(P.CMD_CACHE, 0, MiB)
        c.pwrite(b"", 0)  # zero-length requests are harmless no-ops
        c.trim(0, 0)
    assert list(srv.tracker.bitmap.extents()) == [
        (8192, 4096),
        (65536, 65536),
        (MiB, MiB),
        (3 * MiB, 4096),
    ]


def test_block_status_shows_holes(srv: Running) -> None:
    with srv.client(structured=True, meta=True) as c:
        c.trim(MiB, MiB)
        extents = c.block_status(0, SIZE)
        assert sum(n for n, _ in extents) == SIZE
        assert extents[:3] == [(MiB, 0), (MiB, P.STATE_HOLE | P.STATE_ZERO), (2 * MiB, 0)]
        assert c.block_status(MiB, 4 * MiB - MiB)[0] == (MiB, 3)
        c.request(P.CMD_BLOCK_STATUS, 0, SIZE, P.CMD_FLAG_REQ_ONE)
        assert len(c.reply().data) == 4 + 8


def test_oversized_write_and_vanishing_writer(srv: Running) -> None:
    before = srv.digest()
    with srv.client() as good:
        hostile = srv.client()
        hostile.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 64 * MiB))
        assert closed(hostile.sock)  # over the advertised maximum: hang up
        vanishing = srv.client()
        vanishing.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 65536) + b"x" * 1000)
        vanishing.close()  # gone mid-payload
        garbage = srv.client()
        garbage.send(b"\xde\xad\xbe\xef" * 16)
        assert closed(garbage.sock)
        assert good.pread(0, 256) == bytes(range(256))
    assert srv.digest() == before and srv.tracker.bitmap.count() == 0


def test_big_writes_arrive_whole(srv: Running) -> None:
    """WRITEs of 64 KiB and more (the native loop moves their payload socket -> pipe -> volume)
    pipelined with small ones and sent in uneven pieces, one with FUA, land whole and are
    tracked; a writer gone with most of a 1 MiB payload sent leaves the volume untouched."""
    rng = random.Random(3)
    plan = [(0, MiB, 0), (MiB, 65536, P.CMD_FLAG_FUA), (MiB + 65536, 4096, 0)]
    plan += [(MiB + 69632, 200000, 0), (2 * MiB, MiB + 4096, 0), (3 * MiB + 8192, 512, 0)]
    model = bytearray(srv.image.read_bytes())
    blob = b""
    for cookie, (offset, length, flags) in enumerate(plan):
        data = rng.randbytes(length)
        model[offset : offset + length] = data
        blob += P.REQUEST.pack(P.REQUEST_MAGIC, flags, P.CMD_WRITE, cookie, offset, length) + data
    with srv.client() as c:
        pos = 0
        while pos < len(blob):
            step = rng.choice((28, 1000, 65536, 300000))
            c.send(blob[pos : pos + step])
            pos += step
        replies = [c.reply() for _ in plan]
        assert sorted(r.cookie for r in replies) == list(range(len(plan)))
        assert all(r.error == 0 for r in replies)
        assert c.pread(2 * MiB, MiB + 4096) == model[2 * MiB : 3 * MiB + 4096]
    assert srv.image.read_bytes() == model
    before = srv.digest()
    gone = srv.client()  # a writer that vanishes mid-payload, over an untouched range
    untouched = 3 * MiB + 16384
    head = P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 9, untouched, 512 * 1024)
    gone.send(head + bytes(400 * 1024))
    gone.close()
    deadline = time.monotonic() + 30
    while srv.server._clients and time.monotonic() < deadline:  # its worker saw the end
        time.sleep(0.01)
    assert not srv.server._clients
    assert srv.digest() == before
    tracked = [(0, MiB + 270336), (2 * MiB, MiB + 4096), (3 * MiB + 8192, 4096)]  # 4 KiB blocks
    assert list(srv.tracker.bitmap.extents()) == tracked


def test_big_write_sent_in_crumbs(srv: Running) -> None:
    """A 1 MiB WRITE whose payload starts in 200-byte sends: each usually lands in a pipe slot
    of its own, so the pipe fills long before the payload is in and the native loop takes the
    rest by recv (what it had piped back in its buffer): the data arrives whole either way."""
    data = random.Random(5).randbytes(MiB)
    with srv.client() as c:
        c.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, MiB, MiB))
        for pos in range(0, 400 * 200, 200):
            c.send(data[pos : pos + 200])
            time.sleep(0.0005)
        c.send(data[400 * 200 :])
        assert c.reply().error == 0
        assert c.pread(MiB, MiB) == data


def test_read_only_export(tmp_path: Path) -> None:
    running, thread = start(tmp_path, read_only=True)
    try:
        before = running.digest()
        with running.client(structured=True) as c:
            assert c.flags & P.TFLAG_READ_ONLY and not c.flags & P.TFLAG_SEND_TRIM
            for cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES):
                c.request(cmd, 0, 512, 0, bytes(512) if cmd == P.CMD_WRITE else b"")
                assert c.reply().error == P.EPERM
            assert c.pread(0, 4) == b"\0\1\2\3"
        assert running.digest() == before
    finally:
        running.server.stop()
        thread.join(30)


def test_pipelined_mixed_batch_and_multi_conn(srv: Running) -> None:
    """Many requests in one send, replies matched by cookie; a FLUSH on one connection after
    writes acknowledged on another."""
    with srv.client() as a, srv.client() as b:
        blob = b"".join(
            P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 100 + i, i * 4096, 4096)
            + bytes([i]) * 4096
            for i in range(100)
        )
        a.send(blob)
        cookies = {a.reply().cookie for _ in range(100)}
        assert cookies == set(range(100, 200))
        b.flush()
        assert b.pread(99 * 4096, 4096) == bytes([99]) * 4096
    assert list(srv.tracker.bitmap.extents()) == [(0, 100 * 4096)]


def test_nbd_error_surfaces_in_client(srv: Running) -> None:
    with srv.client() as c, pytest.raises(NBDError) as err:
        c.pread(SIZE, 1)
    assert err.value.code == P.EINVAL
