"""What write tracking costs `shadowblk serve`, counted in instructions instead of timed.

    python -m tools.bench.track_cost [--rounds 1] [--size 256M] [--requests 5000] [--json]
        [--tree DIR]

Throughput and CPU time on this shared 2-core machine swing by ±15 % from round to round, far
more than the ≤ 5 % to be shown. Instructions do not: the server runs under valgrind's callgrind
(user-space instructions of every thread of the process), once with tracking (`--state-dir`)
and once without, and fio (`--ioengine=nbd`, natively, fixed request counts) drives the same
phases against both. Around each phase `callgrind_control --zero` and `--dump` take exactly that
phase's instructions; the server's idle instructions per second (measured for 10 s before the
phases: the listener's and idle workers' timeouts) times the phase's length are taken off, and
the rest is divided by its requests. A phase's figure includes its fio connection's own costs
(the handshake, the workers' buffers growing to 1 MiB), the same with tracking on and off: `on −
off`, the instructions tracking adds per request, is the figure that does not depend on them.
The dump also counts the server's calls of `fdatasync` (the activity log's, in a first pass):
their time is in the kernel and on the disk, which callgrind does not see, so it is reported
beside (under valgrind the batches are larger than natively, so a first pass logs its regions
in fewer records than it would natively).

Phases, in this order, one server per configuration on a fresh state folder and the same
pre-filled file; the first phase works in the file's first half, the others in its second half:
`4k randwrite qd16, first pass` (REQUESTS random writes, the first write into each 4 MiB region
logs it), `1M write qd4, first pass` (one sequential pass, every region new), `1M write qd4,
rewrite` (the same pass again: every region logged), `4k randwrite qd16, rewrite` and `4k
randwrite qd1, rewrite` (REQUESTS random writes into logged regions).
`--tree DIR` runs the server from DIR, a copy of another tree's `shadowblk/` package (with its
built `_native` modules), to count a change's effect. The periodic checkpoint is pushed out of
the run (`--save-interval 3600`): under valgrind the wall clock runs ~50× slow, so 30 s
checkpoints would fall 50× too often per request.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from shadowblk.ports import free_port
from tools.bench.nbd_fio import ROOT, fill, run_fio, stop_server, wait_port
from tools.bench.workdir import scratch

# (name, fio rw, block size, queue depth, in the second half, one pass instead of REQUESTS)
PHASES = [
    ("4k randwrite qd16, first pass", "randwrite", "4k", 16, False, False),
    ("1M write qd4, first pass", "write", "1M", 4, True, True),
    ("1M write qd4, rewrite", "write", "1M", 4, True, True),
    ("4k randwrite qd16, rewrite", "randwrite", "4k", 16, True, False),
    ("4k randwrite qd1, rewrite", "randwrite", "4k", 1, True, False),
]
ORDER = [name for name, *_ in PHASES]


def start(image: Path, state: Path | None, out: Path, tree: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p"]
    argv += [sys.executable, "-m", "shadowblk.cli", "serve", str(image)]
    argv += ["--listen", f"127.0.0.1:{port}", "--name", "vol"]
    if state is not None:
        argv += ["--state-dir", str(state), "--save-interval", "3600"]
    with (out / "valgrind.log").open("ab") as log:
        proc = subprocess.Popen(
            argv,
            cwd=tree,  # `python -m` puts the working folder first on sys.path
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    wait_port(port, proc, timeout=600)
    return proc, port


def callgrind(proc: subprocess.Popen, command: str) -> None:
    done = subprocess.run(
        ["callgrind_control", f"--{command}", str(proc.pid)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control --{command} failed: {done.stderr.strip()}")


def dump(proc: subprocess.Popen, out: Path) -> tuple[int, int]:
    """(instructions, fdatasync calls) since the last zeroing."""
    before = set(out.glob("cg.*"))
    callgrind(proc, "dump")
    (path,) = set(out.glob("cg.*")) - before
    return read_dump(path)


def idle_rate(proc: subprocess.Popen, out: Path, seconds: float = 10.0) -> float:
    """Instructions per second of the server doing nothing (the listener's and the idle
    workers' 0.2 s timeouts), to take off each phase in proportion to its length: a phase
    runs for minutes under valgrind, and these would otherwise count as its requests' cost."""
    callgrind(proc, "zero")
    started = time.monotonic()
    time.sleep(seconds)
    instructions, _ = dump(proc, out)
    return instructions / (time.monotonic() - started)


def read_dump(path: Path) -> tuple[int, int]:
    """(instructions, calls of fdatasync) in one callgrind dump."""
    names: dict[str, str] = {}
    total = syncs = 0
    callee = ""
    for line in path.read_text().splitlines():
        if line.startswith("summary:"):
            total = int(line.split()[1])
        elif line.startswith(("fn=", "cfn=")):  # "fn=(ID) NAME" the first time, then "fn=(ID)"
            m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line)
            if m:
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                if line.startswith("cfn="):
                    callee = names.get(m.group(1), "")
        elif line.startswith("calls=") and callee == "fdatasync":
            syncs += int(line.split("=")[1].split()[0])
    return total, syncs


def measure(
    image: Path, tracked: bool, work: Path, size: int, requests: int, tree: Path
) -> dict[str, tuple[float, float]]:
    """Run one server through PHASES: {phase: (instructions, fdatasyncs) per request}."""
    out = work / f"cg-{int(tracked)}"
    out.mkdir()
    state = work / "state" if tracked else None
    proc, port = start(image, state, out, tree)
    figures: dict[str, tuple[float, float]] = {}
    try:
        idle = idle_rate(proc, out)
        half = size // 2
        for name, rw, bs, depth, second, one_pass in PHASES:
            count = half >> 20 if one_pass else requests
            offset = half if second else 0
            started = time.monotonic()
            callgrind(proc, "zero")
            res = run_fio(port, rw, bs, depth, f"{half}", 0, out / "fio.json", count, offset)
            instructions, syncs = dump(proc, out)
            instructions -= int(idle * (time.monotonic() - started))
            figures[name] = (instructions / res.requests, syncs / res.requests)
            print(
                f"# {'on ' if tracked else 'off'} {name:30} {res.requests:6d} requests "
                f"{instructions / res.requests:10.0f} instructions/request "
                f"{syncs:4d} fdatasync",
                file=sys.stderr,
                flush=True,
            )
    finally:
        stop_server(proc, 300)  # callgrind writes its last dump on the way out
    return figures


def main(argv: list[str] | None = None) -> None:
    """Run the comparison; ARGV None (as from tools.bench.run) means the defaults."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="repeat everything (default 1)")
    ap.add_argument("--size", default="256M", help="the volume (default 256M)")
    ap.add_argument("--requests", type=int, default=5000, help="4 KiB writes per phase")
    ap.add_argument("--tree", type=Path, default=ROOT, help="serve from this folder's shadowblk/")
    ap.add_argument("--dir", type=Path, default=None, help="where the scratch folder goes")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv or [])
    if not re.fullmatch(r"\d+[MG]", args.size):
        ap.error(f"--size {args.size}: give MiB or GiB, like 256M")
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
    if not (args.tree / "shadowblk" / "cli").is_dir():
        ap.error(f"--tree {args.tree}: no shadowblk/ package there")
    # {phase: {"on"/"off": [(instructions, fdatasyncs) per request, one per round]}}
    rows: dict[str, dict[str, list[tuple[float, float]]]] = {
        name: {"on": [], "off": []} for name in ORDER
    }
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on TERM too
    with scratch("trackcost-", args.dir) as work:
        image = work / "vol.img"
        fill(image, size)
        for rnd in range(args.rounds):
            for tracked in (True, False) if rnd % 2 == 0 else (False, True):
                sub = work / f"r{rnd}"
                sub.mkdir(exist_ok=True)
                figures = measure(image, tracked, sub, size, args.requests, args.tree)
                for name, value in figures.items():
                    rows[name]["on" if tracked else "off"].append(value)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        "| phase | instructions/request, tracking on | off | on − off | on / off "
        "| fdatasync/request, on |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in ORDER:
        on = statistics.median(v[0] for v in rows[name]["on"])
        off = statistics.median(v[0] for v in rows[name]["off"])
        syncs = statistics.median(v[1] for v in rows[name]["on"])
        print(f"| {name} | {on:.0f} | {off:.0f} | {on - off:.0f} | {on / off:.3f} | {syncs:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
