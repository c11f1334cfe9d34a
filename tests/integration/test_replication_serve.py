"""A replicated primary end to end: `shadowblk serve --shadow A --shadow B` with two real
`shadowblk shadow` processes, written by fio (crc32c verify) and qemu-io; the shadows must be
byte-identical to the primary (cmp) and `shadowblk status --state-dir` must say so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from shadowblk.nbd.replication import StatusUnavailable, read_status
from tests.delta_driver import durable_epoch, make_key, start_shadow
from tests.integration.test_serve_clients import run
from tests.integration.test_shadow_tls import pki  # noqa: F401 - the PKI fixture
from tests.procs import SHADOWBLK, Processes

VOLUME = "vol1"


def start_primary(
    procs: Processes,
    tmp_path: Path,
    ports: Sequence[int],
    key: Path,
    mode: str,
    size: str = "32M",
    extra: Sequence[str] = (),
) -> tuple[subprocess.Popen, str]:
    """`shadowblk serve` of tmp_path/vol1 replicated to PORTS; returns it and its URL."""
    shadows = [arg for port in ports for arg in ("--shadow", f"127.0.0.1:{port}")]
    proc = procs.start(
        [
            *SHADOWBLK,
            "serve",
            str(tmp_path / f"{VOLUME}.img"),
            "--size",
            size,
            "--name",
            VOLUME,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state"),
            "--mode",
            mode,
            "--max-lag",
            "0.2",
            "--hmac-key-file",
            str(key),
            *shadows,
            *extra,
        ],
        "serve",
    )
    return proc, procs.wait_ready(proc).split()[1]


def converged(state_dir: Path, timeout: float = 60) -> dict:
    """Wait until every shadow is connected, in sync, has applied the last cut epoch and
    nothing is left to ship, in a status published after this call; returns that status.
    Fails with the last status on timeout."""
    since = time.time()
    deadline = time.monotonic() + timeout
    doc: dict = {}
    while time.monotonic() < deadline:
        try:
            doc = read_status(state_dir)
        except StatusUnavailable as exc:
            doc = {"unavailable": str(exc)}
        else:
            if (
                doc["updated"] > since
                and doc["lag_bytes"] == 0
                and all(
                    s["connected"] and s["in_sync"] and s["acked_epoch"] == doc["last_cut_epoch"]
                    for s in doc["shadows"]
                )
            ):
                return doc
        time.sleep(0.1)
    raise AssertionError(f"shadows did not converge within {timeout}s: {doc}")


def cmp(a: Path, b: Path) -> None:
    out = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def shadows(procs: Processes, tmp_path: Path, key: Path) -> list[int]:
    return [start_shadow(procs, tmp_path / f"s{i}", key, f"shadow{i}")[1] for i in range(2)]


def status_cli(state_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SHADOWBLK, "status", "--state-dir", str(state_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_fio_through_primary_with_two_shadows(procs: Processes, tmp_path: Path, mode: str) -> None:
    key = make_key(tmp_path / "key")
    ports = shadows(procs, tmp_path, key)
    proc, url = start_primary(procs, tmp_path, ports, key, mode)
    fio = run(
        [
            "fio",
            "--name=replicated",
            "--ioengine=nbd",
            f"--uri={url}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--output-format=json",
        ],
        cwd=tmp_path,
    )
    job = json.loads(fio.stdout[fio.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 32 << 20
    run(["qemu-io", "-f", "raw", "-c", "flush", url])
    converged(tmp_path / "state")
    cli = status_cli(tmp_path / "state")  # the operator's view agrees
    assert cli.returncode == 0, cli.stderr
    doc = json.loads(cli.stdout)
    assert doc["mode"] == mode and not doc["fenced"] and len(doc["shadows"]) == 2
    for shadow in doc["shadows"]:
        assert shadow["connected"] and shadow["in_sync"], shadow
        assert shadow["lag_bytes"] == 0 and shadow["lag_seconds"] == 0, shadow
        assert shadow["acked_epoch"] == doc["last_cut_epoch"] > 0
    assert procs.stop(proc) == 0
    for i in range(2):
        cmp(tmp_path / f"{VOLUME}.img", tmp_path / f"s{i}" / f"{VOLUME}.img")
    stopped = status_cli(tmp_path / "state")
    assert stopped.returncode == 1 and "no server is running" in stopped.stderr


def test_sync_flush_returns_once_every_shadow_applied(procs: Processes, tmp_path: Path) -> None:
    """sync mode: when qemu-io's FLUSH returns, both shadows' state files already name the
    epoch that flush cut and their images hold the data (read before anything else happens)."""
    key = make_key(tmp_path / "key")
    ports = shadows(procs, tmp_path, key)
    proc, url = start_primary(procs, tmp_path, ports, key, "sync", size="16M")
    converged(tmp_path / "state")
    seen = []
    for i in range(6):
        pattern, offset = 0x30 + i, (i * 2 + 1) << 20
        run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} 64k", "-c", "flush", url])
        applied = [durable_epoch(tmp_path / f"s{k}", VOLUME) for k in range(2)]
        for k in range(2):
            with open(tmp_path / f"s{k}" / f"{VOLUME}.img", "rb") as f:
                assert os.pread(f.fileno(), 65536, offset) == bytes([pattern]) * 65536
        doc = converged(tmp_path / "state")  # no write since: the last cut is that flush's
        seen.append(doc["last_cut_epoch"])
        assert all(a >= doc["last_cut_epoch"] for a in applied), (applied, doc)
    assert len(set(seen)) == len(seen)  # every flush cut an epoch of its own
    # a FUA write is a flush of its own: on both shadows when it is acknowledged
    run(["qemu-io", "-f", "raw", "-c", f"write -f -P 0x77 {15 << 20} 4k", url])
    for k in range(2):
        with open(tmp_path / f"s{k}" / f"{VOLUME}.img", "rb") as f:
            assert os.pread(f.fileno(), 4096, 15 << 20) == b"\x77" * 4096
    # unaligned writes (merged with the volume's blocks), TRIM, WRITE_ZEROES: cmp below
    cmds = ["write -P 0x41 1000 3000", "write -P 0x42 9000 100", "discard 1M 512k"]
    cmds += ["write -z 3M 64k", "write -z -u 5M 1M", "write -P 0x43 5M 1"]
    run(["qemu-io", "-f", "raw", *[a for c in cmds for a in ("-c", c)], "-c", "flush", url])
    assert procs.stop(proc) == 0
    for k in range(2):
        cmp(tmp_path / f"{VOLUME}.img", tmp_path / f"s{k}" / f"{VOLUME}.img")


def test_status_without_a_server(procs: Processes, tmp_path: Path) -> None:
    missing = status_cli(tmp_path / "nothing")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    key = make_key(tmp_path / "key")
    proc, _ = start_primary(procs, tmp_path, [1], key, "async", size="1M")
    assert status_cli(tmp_path / "state").returncode == 0
    proc.send_signal(signal.SIGKILL)  # no clean stop: the file stays, marked running
    proc.wait()
    time.sleep(0.2)
    dead = status_cli(tmp_path / "state")
    assert dead.returncode == 1 and "no server is running" in dead.stderr, dead.stderr
    assert "s old" in dead.stderr


def test_a_newer_generation_on_a_shadow_fences_the_primary(
    procs: Processes, tmp_path: Path
) -> None:
    """A shadow that saw generation 2 refuses a generation-1 primary: every write then fails
    with EIO (reads still work), and status says fenced."""
    key = make_key(tmp_path / "key")
    port = start_shadow(procs, tmp_path / "s0", key, "shadow0")[1]
    proc, url = start_primary(procs, tmp_path, [port], key, "async", "4M", ["--generation", "2"])
    converged(tmp_path / "state")
    assert procs.stop(proc) == 0
    proc, url = start_primary(procs, tmp_path, [port], key, "async", "4M")
    deadline = time.monotonic() + 30
    while not read_status(tmp_path / "state")["fenced"]:
        assert time.monotonic() < deadline, read_status(tmp_path / "state")
        time.sleep(0.1)
    for _ in range(2):
        refused = run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k", url], check=False)
        assert "Input/output error" in refused.stdout + refused.stderr, refused.stdout
    run(["qemu-io", "-f", "raw", "-c", "read -P 0 0 4k", url])  # untouched, still readable
    assert json.loads(status_cli(tmp_path / "state").stdout)["fenced"]
    assert procs.stop(proc) == 0  # a fenced server still stops cleanly (no drain to wait for)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "no spaces", "--state-dir", "S", "--hmac-key-file", "K"], "valid volume id"),
        (["--hmac-key-file", "K"], "--shadow needs --state-dir"),
        (["--state-dir", "S"], "--shadow needs --hmac-key-file"),
        (["--state-dir", "S", "--hmac-key-file", "K", "--mode", "both"], "'both' is not one of"),
    ],
)
def test_bad_replication_options_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    key = make_key(tmp_path / "key")
    argv = [str(key) if a == "K" else str(tmp_path / "state") if a == "S" else a for a in args]
    volume = tmp_path / "v.img"
    out = subprocess.run(
        [*SHADOWBLK, "serve", str(volume), "--size", "1M", "--shadow", "127.0.0.1:9", *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert not volume.exists() and not (tmp_path / "state").exists()  # refused before opening


def test_mutual_tls_to_the_shadow(procs: Processes, tmp_path: Path, pki: Path) -> None:  # noqa: F811
    """--shadow-tls-* instead of a shared key: the stream is TLS with client certificates."""
    shadow = procs.start(
        [
            *SHADOWBLK,
            "shadow",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "s0"),
            *("--tls-cert", str(pki / "shadow-cert.pem"), "--tls-key", str(pki / "shadow-key.pem")),
            *("--tls-ca", str(pki / "ca-cert.pem")),
        ],
        "shadow0",
    )
    port = int(procs.wait_ready(shadow).rsplit(":", 1)[1])
    tls = ["--shadow-tls-cert", str(pki / "primary-cert.pem")]
    tls += [
        "--shadow-tls-key",
        str(pki / "primary-key.pem"),
        "--shadow-tls-ca",
        str(pki / "ca-cert.pem"),
    ]
    proc = procs.start(
        [
            *SHADOWBLK,
            "serve",
            str(tmp_path / f"{VOLUME}.img"),
            *("--size", "4M", "--name", VOLUME, "--listen", "127.0.0.1:0"),
            *("--state-dir", str(tmp_path / "state")),
            *("--mode", "sync", "--shadow", f"127.0.0.1:{port}", *tls),
        ],
        "serve",
    )
    url = procs.wait_ready(proc).split()[1]
    converged(tmp_path / "state")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 64k 1M", "-c", "flush", url])
    with open(tmp_path / "s0" / f"{VOLUME}.img", "rb") as f:
        assert os.pread(f.fileno(), 4096, 64 << 10) == b"\x66" * 4096  # sync: there at once
    assert procs.stop(proc) == 0
    cmp(tmp_path / f"{VOLUME}.img", tmp_path / "s0" / f"{VOLUME}.img")
