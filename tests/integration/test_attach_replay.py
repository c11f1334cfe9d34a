"""The replay of unflushed writes after a lost upstream runs with the gate open: a new write on a
block still being replayed must land after the replayed one, and every unflushed write must
reach the new upstream.

The new upstream (`nbdkit file` on its own, empty file) holds none of the writes the dead one
(`shadowblk serve` on another file) answered: the worst case of a shadow that lacks them all.
fio writes pattern 0x11 over the first 32 MiB without a FLUSH, the serve is killed, a second
fio starts on the first 16 MiB (held at the gate), the router is repointed: the second fio's
read-back verification fails if a replayed write overtook one of its writes, and the last
16 MiB read back through the new upstream must be all 0x11 (the replay alone put them there).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from tests.integration.test_attach_switchover import (
    SIZE,
    control,
    fio,
    fio_result,
    repoint,
    start_attach,
    start_nbdkit,
    start_serve,
)
from tests.procs import Processes


def status(ctl: str) -> dict:
    return control(ctl, "GET", "/status")[1]


def test_replay_with_the_gate_open_keeps_every_write_and_its_order(
    procs: Processes, tmp_path: Path
) -> None:
    serve, serve_uri = start_serve(procs, tmp_path / "a.img")
    empty = tmp_path / "b.img"
    subprocess.run(["truncate", "-s", SIZE, str(empty)], check=True)
    _, kit_uri = start_nbdkit(procs, empty)
    _, uri, ctl = start_attach(procs, serve_uri, "--generation", "1", "--hold-time", "60")

    first = fio(tmp_path, uri, "--size=32M", "--verify=0", "--buffer_pattern=0x11", name="p1")
    fio_result(tmp_path, first, name="p1")
    before = status(ctl)
    assert before["unflushed_bytes"] >= 32 << 20, before  # fio sent no FLUSH: all kept

    procs.stop(serve, signal.SIGKILL)
    second = fio(tmp_path, uri, "--size=16M", "--randseed=11", name="p2")
    deadline = time.monotonic() + 30
    while status(ctl)["queued"] == 0:  # the second fio's writes wait at the gate
        assert time.monotonic() < deadline and second.poll() is None
        time.sleep(0.02)
    code, answer = repoint(ctl, kit_uri, 2)
    assert code == 200, answer
    assert answer["replay_writes"] == 8192, answer  # every 4 KiB block of 32 MiB, once each
    fio_result(tmp_path, second, name="p2")  # verified: no replayed write overtook its own

    after = status(ctl)
    assert after["errors"] == 0 and after["replayed"] == 8192, after
    assert after["replay_waits"] > 0, after  # its writes did meet blocks being replayed
    assert after["last_repoint"]["replay_ms"] is not None, after
    read = subprocess.run(
        ["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 16M 16M", kit_uri],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, (
        read.stdout + read.stderr
    )
