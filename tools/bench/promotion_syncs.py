"""The syncs and milliseconds of a promotion's file work, on one machine, without a fleet.

    python -m tools.bench.promotion_syncs [--shadows 2] [--rounds 5] [--dir DIR]

What the target agent does in the VM's pause after the shadow server let go of the volume
(docs/switchover.md, `promote`): `switch.recover`, `switch.take_shadow` (the shadow's files
become the primary's, with its replication state), then `go` to a waiting standby `serve
--standby`, which opens the volume and prints its ready line, while `switch.settle` syncs the
replication state (counted in `go`). A 256 MiB shadow (state at epoch
7, its checksum map) is made in DIR, a real standby `serve` started (its shadows unreachable:
only its start is measured), and the promotion run ROUNDS times, timed (median / max of each
step). One more round runs under `strace -f` and counts the fsync, fdatasync and syncfs calls
of every process between the steps (markers are files the promotion opens), the numbers that
do not depend on how busy the disk is. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shadowblk.agent import switch
from shadowblk.delta.volume_state import VolumeState
from shadowblk.integrity.checksum_map import ChecksumMap
from tests.procs import SHADOWBLK

SIZE = 256 << 20
STEPS = ("recover", "take", "go", "ready")
SYNCS = ("fsync(", "fdatasync(", "syncfs(")


def _command(path: Path, cmd: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(json.dumps(cmd).encode() + b"\n")
        with sock.makefile("rb") as stream:
            return json.loads(stream.readline())


def once(root: Path, shadows: int) -> dict[str, float]:
    """One promotion in ROOT (made afresh): the milliseconds of each step."""
    shutil.rmtree(root, ignore_errors=True)
    sh, pr = root / "shadows", root / "primaries"
    sh.mkdir(parents=True)
    pr.mkdir()
    with open(sh / "v1.img", "wb") as f:
        f.truncate(SIZE)
    VolumeState("v1", SIZE, 4096, 1, 7).save(sh / "v1.state")
    ChecksumMap.open_or_rebuild(sh / "v1.map", sh / "v1.img", 4096, writable=True).close()
    key = root / "key"
    key.write_bytes(os.urandom(32))
    ctl = root / "v1.ctl"
    addresses = [f"127.0.0.1:{i + 1}" for i in range(shadows)]
    argv = [*SHADOWBLK, "serve", str(pr / "v1.img"), "--listen", "127.0.0.1:0", "--name", "v1",
            "--size", str(SIZE), "--state-dir", str(pr / "v1.state"), "--control-socket",
            str(ctl), "--lease", "30", "--generation", "2", "--standby", "--drain-timeout", "0",
            "--mode", "async", "--hmac-key-file", str(key),
            *(arg for a in addresses for arg in ("--shadow", a))]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # the standby is loaded once its control socket answers
            try:
                _command(ctl, {"op": "status"})
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the standby serve did not start")
                time.sleep(0.01)
        marks = [time.monotonic()]
        (root / "mark-recover").touch()  # the markers strace sees (openat)
        switch.recover(sh, "v1")
        marks.append(time.monotonic())
        (root / "mark-take").touch()
        switch.take_shadow(sh, pr, "v1", addresses, keep_tracking=True, durable=False)
        marks.append(time.monotonic())
        (root / "mark-go").touch()
        _command(ctl, {"op": "go", "lease": 30})
        switch.settle(sh, pr, "v1")  # as the agent: while the standby opens the volume
        marks.append(time.monotonic())
        (root / "mark-ready").touch()
        if not (proc.stdout.readline() if proc.stdout else "").startswith("ready "):
            sys.exit("the promoted serve did not print its ready line")
        marks.append(time.monotonic())
        (root / "mark-end").touch()
    finally:
        proc.terminate()
        proc.wait(30)
    return {s: (b - a) * 1000 for s, a, b in zip(STEPS, marks, marks[1:], strict=False)}


def count_syncs(trace: Path) -> dict[str, int]:
    """Sync calls in TRACE (strace -f output) per step, between the marker files' openat."""
    counts = dict.fromkeys(STEPS, 0)
    step = None
    for line in trace.read_text().splitlines():
        for name in (*STEPS, "end"):
            if f'/mark-{name}"' in line and "openat(" in line:
                step = name if name != "end" else None
        if step is not None and any(s in line for s in SYNCS) and "resumed>" not in line:
            counts[step] += 1
    return counts


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shadows", type=int, default=2, help="the new primary's shadows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--once", type=Path, help=argparse.SUPPRESS)  # the strace'd round
    args = parser.parse_args(argv)
    if args.once:
        once(args.once, args.shadows)
        return
    work = Path(tempfile.mkdtemp(prefix="promote-", dir=args.dir))
    timed = [once(work / f"r{i}", args.shadows) for i in range(args.rounds)]
    trace = work / "strace.txt"
    subprocess.run(["strace", "-f", "-e", "trace=fsync,fdatasync,syncfs,openat", "-o",
                    str(trace), sys.executable, "-m", "tools.bench.promotion_syncs", "--once",
                    str(work / "traced"), "--shadows", str(args.shadows)], check=True)  # fmt: skip
    syncs = count_syncs(trace)
    print(f"| step ({args.shadows} shadows) | ms, median / max of {args.rounds} | syncs |")
    print("|---|---|---|")
    for step in STEPS:
        values = [t[step] for t in timed]
        print(f"| {step} | {statistics.median(values):.1f} / {max(values):.1f} | {syncs[step]} |")
    print(f"(work dir {work}; load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main(sys.argv[1:])
