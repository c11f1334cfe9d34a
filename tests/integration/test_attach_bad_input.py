"""Bad input at the router's NBD port and control endpoint: a clear error, and it keeps serving.

Also the refusals of a repoint: an older generation (I3), an upstream of another size, an
unreachable one, a URI that is not nbd://.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path

import pytest

from shadowblk.nbd import protocol as P
from shadowblk.nbd.client import NBDClient
from tests.integration.test_attach_switchover import (
    control,
    repoint,
    start_attach,
    start_nbdkit,
    start_serve,
)
from tests.procs import Processes


@pytest.fixture
def router(procs: Processes, tmp_path: Path) -> dict:
    image = tmp_path / "disk.img"
    _, serve_uri = start_serve(procs, image)
    _, kit_uri = start_nbdkit(procs, image)
    proc, uri, ctl = start_attach(procs, serve_uri, "--generation", "5")
    port = int(uri.rsplit(":", 1)[1].split("/")[0])
    return {"proc": proc, "uri": uri, "ctl": ctl, "port": port, "kit": kit_uri, "tmp": tmp_path}


def still_serves(r: dict) -> None:
    """A real client still reads and writes through the router, which is still running."""
    io = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x33 4096 4096", "-c", "read -P 0x33 4096 4096",
         r["uri"]], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert io.returncode == 0 and "verification failed" not in io.stdout, io
    assert r["proc"].poll() is None


def raw_session(port: int) -> socket.socket:
    """A socket past the greeting, client flags sent (fixed newstyle, no zeroes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    magic, opt, _ = P.SERVER_GREETING.unpack(sock.recv(18, socket.MSG_WAITALL))
    assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
    sock.sendall(P.CLIENT_FLAGS.pack(P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES))
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_bad_handshake_disconnects_that_client(router: dict) -> None:
    for garbage in (
        struct.pack(">QII", 0xDEADBEEF, P.OPT_GO, 0),  # bad option magic
        struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, 1 << 30),  # hostile option length
        struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, 5) + b"other",  # unknown export
    ):
        with raw_session(router["port"]) as sock:
            sock.sendall(garbage)
            assert closed_by_peer(sock), garbage
    with socket.create_connection(("127.0.0.1", router["port"]), timeout=10) as sock:
        sock.recv(18, socket.MSG_WAITALL)
        sock.sendall(P.CLIENT_FLAGS.pack(1 << 7))  # unknown client flags
        assert closed_by_peer(sock)
    still_serves(router)


def test_options_refused_with_clear_errors(router: dict) -> None:
    with raw_session(router["port"]) as sock:
        for option, data, expected in (
            (P.OPT_STRUCTURED_REPLY, b"", P.REP_ERR_UNSUP),
            (P.OPT_STARTTLS, b"", P.REP_ERR_POLICY),
            (P.OPT_GO, P.U32.pack(5) + b"wrong" + b"\0\0", P.REP_ERR_UNKNOWN),
            (P.OPT_GO, b"\0\0", P.REP_ERR_INVALID),
            (99, b"", P.REP_ERR_UNSUP),
        ):
            sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data)
            _, opt, rtype, length = P.OPTION_REPLY.unpack(sock.recv(20, socket.MSG_WAITALL))
            message = sock.recv(length, socket.MSG_WAITALL).decode()
            assert (opt, rtype) == (option, expected) and message, (option, rtype, message)
    still_serves(router)


def test_bad_requests_get_errors_not_a_crash(router: dict) -> None:
    size = 64 << 20
    with NBDClient("127.0.0.1", router["port"], "vol") as client:
        for cmd, offset, length, flags, payload, code in (
            (P.CMD_READ, size - 4096, 8192, 0, b"", P.EINVAL),  # past the end
            (P.CMD_WRITE, size, 4096, 0, b"x" * 4096, P.ENOSPC),
            (P.CMD_BLOCK_STATUS, 0, 4096, 0, b"", P.EINVAL),  # needs structured replies
            (42, 0, 4096, 0, b"", P.EINVAL),  # no such command
            (P.CMD_READ, 0, 4096, 1 << 9, b"", P.EINVAL),  # unknown flag
            (P.CMD_FLUSH, 0, 4096, 0, b"", P.EINVAL),  # a flush has no range
        ):
            client.request(cmd, offset, length, flags, payload)
            assert client.reply().error == code, (cmd, offset, length, flags)
        assert client.pread(0, 4096) == bytes(4096)  # the same connection still works
    with NBDClient("127.0.0.1", router["port"], "vol") as client:
        client.send(P.REQUEST.pack(0x12345678, 0, P.CMD_READ, 1, 0, 4096))  # bad request magic
        assert closed_by_peer(client.sock)
    still_serves(router)


def test_control_bad_input(router: dict) -> None:
    for body, status, words in (
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 422, "object"),
        (b'{"generation": 6}', 422, "uri"),
        (b'{"uri": "nbd://127.0.0.1:1/vol", "generation": "6"}', 422, "generation"),
        (b'{"uri": "nbd://127.0.0.1:1/vol", "generation": -1}', 422, "generation"),
        (b'{"uri": "http://x/vol", "generation": 6}', 422, "nbd://"),
        (b'{"uri": "nbd://127.0.0.1:1/vol", "generation": 6}', 502, "cannot connect"),
        (b'{"uri": "nbd://127.0.0.1:1/vol", "generation": 4}', 409, "older"),
        (b"x" * 70000, 413, "body"),
    ):
        code, answer = control(router["ctl"], "POST", "/repoint", body)
        assert code == status and words in answer["error"], (body[:60], code, answer)
    state = control(router["ctl"], "GET", "/status")[1]
    assert state["generation"] == 5 and not state["paused"] and state["upstream_alive"]
    assert state["repoints"] == 1  # only the first connection
    still_serves(router)


def test_upstream_of_another_size_refused(router: dict, procs: Processes) -> None:
    small = router["tmp"] / "tiny.img"
    small.write_bytes(bytes(1 << 20))
    _, tiny = start_nbdkit(procs, small)
    code, answer = repoint(router["ctl"], tiny, 6)
    assert code == 409 and "bytes" in answer["error"], answer
    assert control(router["ctl"], "GET", "/status")[1]["generation"] == 5
    still_serves(router)


def test_older_generation_refused_newer_accepted(router: dict) -> None:
    code, answer = repoint(router["ctl"], router["kit"], 4)
    assert code == 409 and "older than the current 5" in answer["error"]
    assert repoint(router["ctl"], router["kit"], 5)[0] == 200  # the same generation: a reconnect
    assert repoint(router["ctl"], router["kit"], 7)[0] == 200
    code, answer = repoint(router["ctl"], router["kit"], 6)
    assert code == 409, answer
    assert control(router["ctl"], "GET", "/status")[1]["generation"] == 7
    still_serves(router)


def test_control_port_answers_garbage_with_400(router: dict) -> None:
    host, port = router["ctl"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(struct.pack(">QQ", P.NBDMAGIC, P.IHAVEOPT) + b"\r\n\r\n")
        assert sock.recv(64).split(b" ")[1] == b"400"
    assert control(router["ctl"], "GET", "/nothing")[0] == 404
    still_serves(router)
