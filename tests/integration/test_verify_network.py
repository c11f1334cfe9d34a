"""`shadowblk verify --shadow HOST:PORT` over the network: a real `serve --shadow` primary, a
real `shadowblk shadow --verify-listen`, the bytes counted on the socket by a relay between
them; a busy volume under fio; bad input at the verify port."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shadowblk.integrity.discrepancies import DiscrepancyLog
from shadowblk.integrity.tree_wire import GREETING, HEADER, REFUSAL, pack_greeting
from shadowblk.nbd.client import NBDClient
from tests.delta_driver import file_hash, make_key, start_shadow
from tests.integration.test_replication_serve import VOLUME, converged, start_primary
from tests.integration.test_verify_live import BS, MiB, diverge
from tests.pki import make_ca, make_leaf
from tests.procs import SHADOWBLK, Processes, free_port

KiB = 1 << 10
BUSY = 32 * MiB  # fio's region; the rest of the volume is quiet


class CountingRelay:
    """Forwards 127.0.0.1:port to the target port, counting the bytes each way."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.counts = {"up": 0, "down": 0}
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def total(self) -> int:
        with self.lock:
            return self.counts["up"] + self.counts["down"]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst, way in ((client, server, "up"), (server, client, "down")):
                threading.Thread(target=self._pump, args=(src, dst, way), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self.lock:
                    self.counts[way] += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


@dataclass
class Pair:
    key: Path
    shadow_dir: Path
    url: str  # the primary's NBD URL
    state: Path  # the primary's state folder
    verify_port: int
    shadow: subprocess.Popen


def start_pair(
    procs: Processes,
    tmp_path: Path,
    size: str,
    shadow_tls: Sequence[str] = (),
    primary_tls: Sequence[str] = (),
) -> Pair:
    """A shadow with a verify port and a primary replicating to it, converged."""
    key = make_key(tmp_path / "key")
    shadow_dir = tmp_path / "s0"
    verify_port = free_port()
    verify_listen = ["--verify-listen", f"127.0.0.1:{verify_port}"]
    shadow, port = start_shadow(
        procs, shadow_dir, key, "shadow0", extra=[*verify_listen, *shadow_tls]
    )
    _, url = start_primary(procs, tmp_path, [port], key, "async", size=size, extra=primary_tls)
    state = tmp_path / "state"
    converged(state)
    return Pair(key, shadow_dir, url, state, verify_port, shadow)


def verify(state: Path, key: Path, verify_port: int, *extra: str) -> tuple[int, dict, str]:
    out = subprocess.run(
        [
            *SHADOWBLK,
            "verify",
            "--state-dir",
            str(state),
            "--shadow-verify",
            f"127.0.0.1:{verify_port}",
            "--hmac-key-file",
            str(key),
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.startswith("{"), out.stdout + out.stderr
    return out.returncode, json.loads(out.stdout), out.stderr


def nbd(url: str) -> NBDClient:
    host, port = url.removeprefix("nbd://").split("/")[0].split(":")
    return NBDClient(host, int(port), VOLUME)


def test_one_gib_compares_in_a_few_kib_on_the_wire(procs: Processes, tmp_path: Path) -> None:
    pair = start_pair(procs, tmp_path, "1G")
    with nbd(pair.url) as c:
        for offset in (0, 300 * MiB, 1023 * MiB):
            c.pwrite(os.urandom(64 * KiB), offset)
        c.flush()
    converged(pair.state)
    relay = CountingRelay(pair.verify_port)
    try:
        code, doc, err = verify(pair.state, pair.key, relay.port)
        (same,) = doc["compares"]
        assert code == 0 and same["differing"] == [], (doc, err)
        matching = relay.total
        assert 0 < matching <= 4 * KiB, matching  # the issue allows 64 KiB; ~220 B measured
        assert same["wire_bytes"] == matching  # what the client counted is what crossed

        target = 700 * MiB + 3 * BS
        crc = diverge(pair.shadow_dir, target)
        code, doc, err = verify(pair.state, pair.key, relay.port)
        (one,) = doc["compares"]
        assert code == 1 and one["differing_blocks"] == [target // BS], (doc, err)
        assert relay.total - matching - matching <= 8 * KiB, (relay.total, matching)
        assert one["wire_bytes"] - same["wire_bytes"] <= 8 * KiB  # 64 KiB allowed; ~1.5 KiB
    finally:
        relay.close()
    (record,) = DiscrepancyLog.in_state_dir(pair.state).read()
    assert (record.offset, record.side, record.kind, record.actual_crc) == (
        target,
        "shadow",
        "diverged",
        crc,
    )


def start_fio(procs: Processes, tmp_path: Path, url: str) -> subprocess.Popen:
    """Random writes of 512 B..64 KiB (most not block-aligned) with a FLUSH every 16, and
    trims, over the first 32 MiB, until stopped."""
    common = [f"--uri={url}", "--size=32M", "--time_based", "--runtime=600", "--randseed=5"]
    return procs.start(
        [
            "fio",
            "--ioengine=nbd",
            "--name=writes",
            "--rw=randwrite",
            "--bsrange=512-64k",
            "--blockalign=512",
            "--fsync=16",
            "--rate_iops=300",
            *common,
            "--name=trims",
            "--rw=randtrim",
            "--bs=4k",
            "--rate_iops=20",
            *common,
        ],
        "fio",
        cwd=tmp_path,
    )


def test_busy_volume_network_verify(procs: Processes, tmp_path: Path) -> None:
    pair = start_pair(procs, tmp_path, "128M")
    with nbd(pair.url) as c:
        c.pwrite(os.urandom(BS), 100 * MiB)  # something outside the busy region too
        c.flush()
    converged(pair.state)
    fio = start_fio(procs, tmp_path, pair.url)
    try:
        code, doc, err = verify(
            pair.state, pair.key, pair.verify_port, "--repeat", "50", "--recheck-timeout", "0.3"
        )
        compares = doc["compares"]
        assert fio.poll() is None, "fio stopped early"
        assert len(compares) == 50 and all("error" not in c for c in compares), (compares, err)
        assert code == 0 and all(not c["differing"] for c in compares), compares
        assert sum(c["in_flight"] for c in compares) > 0  # the writes were in flight
        assert sum(c["resolved"] for c in compares) > 0  # ... and were rechecked once settled
        assert not DiscrepancyLog.in_state_dir(pair.state).path.exists()

        target = 120 * MiB + 5 * BS  # a real divergence in the quiet part, fio still writing
        crc = diverge(pair.shadow_dir, target)
        code, doc, err = verify(pair.state, pair.key, pair.verify_port, "--recheck-timeout", "0.3")
        (report,) = doc["compares"]
        assert code == 1 and report["differing_blocks"] == [target // BS], (doc, err)
        assert fio.poll() is None, "fio stopped early"
    finally:
        procs.stop(fio)
    (record,) = DiscrepancyLog.in_state_dir(pair.state).read()
    assert record.offset == target and record.actual_crc == crc


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send DATA to the verify port, half-close, return everything it answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(1 << 16):
            out += chunk
        return out


def refusal(reply: bytes) -> str:
    (length,) = REFUSAL.unpack_from(reply, GREETING.size)
    return reply[GREETING.size + REFUSAL.size :][:length].decode()


def test_bad_input_at_the_verify_port(procs: Processes, tmp_path: Path) -> None:
    pair = start_pair(procs, tmp_path, "32M")
    with nbd(pair.url) as c:
        c.pwrite(os.urandom(256 * KiB), 1 * MiB)
        c.flush()
    converged(pair.state)
    files = [pair.shadow_dir / f"{VOLUME}.{ext}" for ext in ("img", "map", "state")]
    before = [file_hash(f) for f in files]

    # garbage, and a greeting of another protocol version: a clear refusal
    assert "not a shadowblk verify peer" in refusal(raw_exchange(pair.verify_port, os.urandom(64)))
    greeting = bytearray(pack_greeting(bytes(16), True))
    greeting[8] = 9
    assert "version 9" in refusal(raw_exchange(pair.verify_port, bytes(greeting)))
    # a greeting that does not promise tagged frames to a shadow with a key
    assert "requires frames tagged" in refusal(
        raw_exchange(pair.verify_port, pack_greeting(bytes(16), False))
    )
    # a valid greeting, then a frame with no valid tag: an error frame, then the end
    frame = HEADER.pack(1, 0x51, 0) + b"\x01" + bytes(16)
    reply = raw_exchange(pair.verify_port, pack_greeting(os.urandom(16), True) + frame)
    assert b"authentication failed" in reply[GREETING.size :]
    # a frame announcing more than the limit
    huge = HEADER.pack(1 << 30, 0x51, 0)
    reply = raw_exchange(pair.verify_port, pack_greeting(os.urandom(16), True) + huge)
    assert b"at most" in reply[GREETING.size :]
    # a truncated greeting, then silence: the connection ends
    assert raw_exchange(pair.verify_port, b"SHBLK") == b""

    # the wrong key, through the command: not compared (2), said clearly
    wrong = make_key(tmp_path / "wrong-key")
    code, doc, _ = verify(pair.state, wrong, pair.verify_port)
    assert code == 2 and "authentication failed" in doc["compares"][0]["error"], doc
    # nothing listening there: not compared
    code, doc, _ = verify(pair.state, pair.key, free_port())
    assert code == 2 and "verify port" in doc["compares"][0]["error"], doc

    # nothing touched, and the shadow still answers
    assert pair.shadow.poll() is None
    assert [file_hash(f) for f in files] == before
    code, doc, err = verify(pair.state, pair.key, pair.verify_port)
    assert code == 0 and doc["compares"][0]["differing"] == [], (doc, err)
    assert not DiscrepancyLog.in_state_dir(pair.state).path.exists()


def tls_args(pki: Path, prefix: str, name: str) -> list[str]:
    return [
        f"--{prefix}tls-cert",
        str(pki / f"{name}-cert.pem"),
        f"--{prefix}tls-key",
        str(pki / f"{name}-key.pem"),
        f"--{prefix}tls-ca",
        str(pki / "ca-cert.pem"),
    ]


def test_verify_port_over_mutual_tls(procs: Processes, tmp_path: Path) -> None:
    """TLS as on the delta port: the deployment's certificate is let in, another CA's is not."""
    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki, "ca")
    make_ca(pki, "rogue-ca")
    for name, ca in (("shadow", "ca"), ("primary", "ca"), ("intruder", "rogue-ca")):
        make_leaf(pki, ca, name)
    pair = start_pair(
        procs,
        tmp_path,
        "32M",
        shadow_tls=tls_args(pki, "", "shadow"),
        primary_tls=tls_args(pki, "shadow-", "primary"),
    )
    code, doc, err = verify(pair.state, pair.key, pair.verify_port, *tls_args(pki, "", "primary"))
    assert code == 0 and doc["compares"][0]["wire_bytes"] > 0, (doc, err)
    code, doc, err = verify(pair.state, pair.key, pair.verify_port, *tls_args(pki, "", "intruder"))
    assert code == 2 and "verify port" in doc["compares"][0]["error"], (doc, err)
    assert pair.shadow.poll() is None
