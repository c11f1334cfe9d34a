"""`shadowblk scrub --state-dir DIR`: the running `serve` scrubs its volume (and its shadow over
the verify port), with real processes: bytes flipped in the primary's backing file and in the
shadow's image, while fio writes and verifies through the primary; bad input on the scrub
socket and at the verify port's READ/SCAN."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import crc32c

from shadowblk.delta.auth import load_key
from shadowblk.integrity.checksum_map import LiveMap
from shadowblk.integrity.discrepancies import DiscrepancyLog
from shadowblk.integrity.tree_client import TreeClient
from shadowblk.integrity.tree_wire import READ, SCAN, WireError
from shadowblk.nbd.scrub_control import SOCKET_FILE
from tests.delta_driver import file_hash, make_key, start_shadow
from tests.integration.test_replication_serve import VOLUME, converged, start_primary
from tests.integration.test_verify_live import BS, MiB
from tests.integration.test_verify_network import Pair, nbd, start_pair
from tests.integrity_lab import flip, read_block
from tests.procs import SHADOWBLK, Processes

PRIMARY_BLOCK = (40 * MiB) // BS  # in the quiet part, past fio's region
SHADOW_BLOCK = (48 * MiB) // BS


def scrub(pair: Pair, *extra: str, shadow: bool = True) -> tuple[int, dict]:
    argv = [*SHADOWBLK, "scrub", "--state-dir", str(pair.state), "--json", *extra]
    if shadow:
        argv += ["--shadow-verify", f"127.0.0.1:{pair.verify_port}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.stdout.startswith("{"), out.stdout + out.stderr
    return out.returncode, json.loads(out.stdout)


def fill(pair: Pair, rng: random.Random, start: int, length: int) -> bytes:
    """Random data written through the primary at START, flushed; returns it."""
    data = rng.randbytes(length)
    with nbd(pair.url) as c:
        c.pwrite(data, start)
        c.flush()
    return data


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def on_shadow_image(pair: Pair, block: int, data: bytes) -> bool:
    """The shadow's map records DATA for BLOCK: its image holds it (the entry follows it)."""
    return int(LiveMap(pair.shadow_dir / f"{VOLUME}.map").crcs[block]) == crc32c.crc32c(data)


def sides(doc: dict) -> list[tuple[str, int, bool]]:
    return sorted((d["side"], d["block"], d["repaired"]) for d in doc["discrepancies"])


def test_flipped_bytes_are_found_attributed_repaired_and_recorded(
    procs: Processes, tmp_path: Path
) -> None:
    pair = start_pair(procs, tmp_path, "64M")
    rng = random.Random(5)
    data = fill(pair, rng, 32 * MiB, 32 * MiB)
    primary_image = tmp_path / f"{VOLUME}.img"
    shadow_image = pair.shadow_dir / f"{VOLUME}.img"
    converged(pair.state)
    assert scrub(pair)[0] == 0

    good = read_block(primary_image, PRIMARY_BLOCK)
    flip(primary_image, PRIMARY_BLOCK)
    code, doc = scrub(pair)  # found, not repaired
    assert code == 2
    assert sides(doc) == [("primary", PRIMARY_BLOCK, False)]
    code, doc = scrub(pair, "--repair")
    assert code == 1
    assert sides(doc) == [("primary", PRIMARY_BLOCK, True)]
    assert read_block(primary_image, PRIMARY_BLOCK) == good

    wanted = data[SHADOW_BLOCK * BS - 32 * MiB :][:BS]
    wait_for(lambda: on_shadow_image(pair, SHADOW_BLOCK, wanted), "the shadow's image")
    flip(shadow_image, SHADOW_BLOCK)
    code, doc = scrub(pair, "--repair")
    assert code == 1
    assert sides(doc) == [("shadow", SHADOW_BLOCK, True)]
    wait_for(lambda: read_block(shadow_image, SHADOW_BLOCK) == wanted, "the block shipped again")
    converged(pair.state)
    assert scrub(pair)[0] == 0
    assert file_hash(primary_image) == file_hash(shadow_image)

    both = SHADOW_BLOCK + 1  # rotted on both sides: nobody holds the truth
    wait_for(lambda: on_shadow_image(pair, both, data[both * BS - 32 * MiB :][:BS]), "the image")
    flip(primary_image, both)
    flip(shadow_image, both)
    code, doc = scrub(pair, "--repair")
    assert code == 2
    assert [(d["side"], d["kind"], d["block"]) for d in doc["discrepancies"]] == [
        ("both", "unresolved", both)
    ]

    records = [
        (r.side, r.block, r.repaired) for r in DiscrepancyLog.in_state_dir(pair.state).read()
    ]
    assert records == [
        ("primary", PRIMARY_BLOCK, False),
        ("primary", PRIMARY_BLOCK, True),
        ("shadow", SHADOW_BLOCK, True),
        ("both", both, False),
    ]


def test_scrubs_while_fio_writes_and_verifies(procs: Processes, tmp_path: Path) -> None:
    pair = start_pair(procs, tmp_path, "64M")
    rng = random.Random(7)
    data = fill(pair, rng, 32 * MiB, 32 * MiB)  # the quiet half, flipped below
    primary_image = tmp_path / f"{VOLUME}.img"
    shadow_image = pair.shadow_dir / f"{VOLUME}.img"
    wanted = data[SHADOW_BLOCK * BS - 32 * MiB :][:BS]
    wait_for(lambda: on_shadow_image(pair, SHADOW_BLOCK, wanted), "the shadow's image")
    good = read_block(primary_image, PRIMARY_BLOCK)
    fio = subprocess.Popen(
        [
            "fio",
            "--name=busy",
            "--ioengine=nbd",
            f"--uri={pair.url}",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=8",
            "--rate=2m",
            "--verify=crc32c",
            "--randseed=11",
            "--fsync=32",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        flip(primary_image, PRIMARY_BLOCK)
        flip(shadow_image, SHADOW_BLOCK)
        code, doc = scrub(pair, "--repair")
        assert code == 1, doc
        assert sides(doc) == [("primary", PRIMARY_BLOCK, True), ("shadow", SHADOW_BLOCK, True)]
        scrubs = 1
        while fio.poll() is None or scrubs < 3:  # no false alarm while fio writes
            code, doc = scrub(pair)
            assert (code, doc["discrepancies"]) == (0, []), doc
            scrubs += 1
        output = fio.communicate()[0]
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, output
    assert read_block(primary_image, PRIMARY_BLOCK) == good
    wait_for(lambda: read_block(shadow_image, SHADOW_BLOCK) == wanted, "the block shipped again")
    converged(pair.state)
    assert file_hash(primary_image) == file_hash(shadow_image)


def ask_raw(state: Path, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(state / SOCKET_FILE))
        sock.sendall(line)
        with sock.makefile("rb") as answers:
            return json.loads(answers.readline())


def test_bad_input_gets_a_clear_error_and_leaves_the_volume_intact(
    procs: Processes, tmp_path: Path
) -> None:
    pair = start_pair(procs, tmp_path, "32M")
    fill(pair, random.Random(3), 0, 4 * MiB)
    converged(pair.state)
    image = tmp_path / f"{VOLUME}.img"
    before = file_hash(image)
    assert (pair.state / SOCKET_FILE).stat().st_mode & 0o777 == 0o600
    bad_lines = {
        b"garbage\n": "not JSON",
        b"[1, 2]\n": "JSON object",
        b'{"op": "rm", "repair": false, "rate": null}\n': "unknown op",
        b'{"op": "scrub", "repair": "yes", "rate": null}\n': "right type",
        b'{"op": "scrub", "repair": false, "rate": -5}\n': "positive",
        b'{"op": "scrub", "repair": false}\n': "missing",
        b'{"op": "scrub", "repair": false, "rate": null, "x": 1}\n': "unknown field",
        b'{"op": "scrub", "repair": false, "rate": null, "shadow": "nowhere"}\n': "HOST:PORT",
        b"{" + b" " * 8192 + b"}\n": "longer than",
    }
    for line, reason in bad_lines.items():
        answer = ask_raw(pair.state, line)
        assert reason in answer["error"], (line[:60], answer)
    refused = b'{"op": "scrub", "repair": true, "rate": null, "shadow": "127.0.0.1:1"}\n'
    assert "did not finish" in ask_raw(pair.state, refused)["error"]

    # the verify port's READ and SCAN refuse what they must not answer
    key = load_key(pair.key)
    with TreeClient("127.0.0.1", pair.verify_port, key, None) as client:
        assert client.send(bytes([READ]) + bytes(12))[:1] == b"\xff"  # before OPEN
        client.open(VOLUME)
        for offset, length in ((1, BS), (0, 0), (32 * MiB, BS), (0, 2 * MiB), (0, 100)):
            try:
                client.read(offset, length)
            except WireError as exc:
                assert "range" in str(exc) or "blocks" in str(exc), exc
            else:
                raise AssertionError(f"READ of {length} at {offset} was answered")
        assert client.send(bytes([SCAN]))[:1] == b"\xff"  # truncated
        assert client.read(0, BS) == read_block(image, 0)
    assert file_hash(image) == before
    assert scrub(pair, "--repair", "--rate", "100")[0] == 0
    assert file_hash(image) == before


def test_a_server_stopping_ends_its_scrub_cleanly(procs: Processes, tmp_path: Path) -> None:
    key = make_key(tmp_path / "key")
    _, port = start_shadow(procs, tmp_path / "s0", key, "shadow0")
    primary, _ = start_primary(procs, tmp_path, [port], key, "async", size="64M")
    state = tmp_path / "state"
    converged(state)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(state / SOCKET_FILE))
        sock.sendall(b'{"op": "scrub", "repair": false, "rate": 1000000}\n')  # 64 s at 1 MB/s
        with sock.makefile("rb") as answers:
            assert json.loads(answers.readline())["phase"] == "primary"  # it runs
            assert procs.stop(primary) == 0
            last = json.loads(answers.readlines()[-1])
    assert "stopping" in last["error"], last
    assert not (state / SOCKET_FILE).exists()


def test_a_volume_not_served_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [*SHADOWBLK, "scrub", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "no server answers" in out.stderr
