"""What a shadow costs the primary's clients: fio against `shadowblk serve` with no shadow, one
async shadow and one sync shadow, interleaved round by round (issue 4's first benchmark item).

    python -m tools.bench.shadow_cost [--rounds 3] [--seconds 8] [--size 256] [--dir DIR]

Four `shadowblk serve` processes run side by side, each on its own file with a state folder
(write tracking on in all, so the difference is what observes the writes): no observer;
`--checksums` alone (one write observer, no shadow: the cost of the observed transmission path
itself); `--mode async` and `--mode sync` with one shadow (and their checksum map, the default),
both shipping to one `shadowblk shadow` process (HMAC, loopback). Per round and workload, each
configuration runs in turn (order rotated), and before each run every shadow has caught up
(connected, in sync, no lag), so no run pays for the previous one's shipping. Prints the
medians and the ratio of each to no shadow, and the CPU per write of the server and of the
shadow process (utime + stime from fio's start until the shadows caught up after it, over
fio's I/Os: the 1 s ramp's writes are not counted); the issue's target: one async shadow keeps at
least 70 % of the 4k randwrite iodepth-16 IOPS of no shadow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from shadowblk.nbd.replication import StatusUnavailable, read_status
from tests.procs import SHADOWBLK, Processes
from tools.bench.workdir import scratch

WORKLOADS = [
    ("4k randwrite qd16", "randwrite", "4k", 16),
    ("4k randwrite qd1", "randwrite", "4k", 1),
    ("1M write qd4", "write", "1M", 4),
]
CONFIGS = ["no shadow", "checksum map", "async shadow", "sync shadow"]


def fio(
    cwd: Path, url: str, rw: str, bs: str, depth: int, size_mib: int, seconds: float
) -> tuple[float, int]:
    """IOPS and I/Os of one fio run (the nbd engine, checked in fio's JSON)."""
    out = cwd / "fio.json"
    argv = ["fio", "--name=cost", "--ioengine=nbd", f"--uri={url}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", f"--size={size_mib}M", "--time_based", f"--runtime={seconds}",
            "--ramp_time=1", "--output-format=json", f"--output={out}"]  # fmt: skip
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, timeout=seconds + 120)
    job = json.loads(out.read_text())["jobs"][0]
    if job["error"] or job["job options"].get("ioengine") != "nbd":
        sys.exit(f"fio did not run the nbd engine cleanly: error {job['error']}")
    return float(job["write"]["iops"]), int(job["write"]["total_ios"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process PID so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def caught_up(state_dir: Path, timeout: float = 600) -> None:
    """Wait until every shadow is connected, in sync and lacks nothing."""
    deadline = time.monotonic() + timeout
    doc: dict = {}
    while time.monotonic() < deadline:
        try:
            doc = read_status(state_dir)
        except StatusUnavailable:
            doc = {}
        shadows = doc.get("shadows", [])
        if shadows and all(s["connected"] and s["in_sync"] and not s["lag_bytes"] for s in shadows):
            return
        time.sleep(0.1)
    sys.exit(f"the shadow did not catch up: {doc}")


def start(procs: Processes, work: Path, name: str, size_mib: int, *extra: str) -> tuple[str, int]:
    proc = procs.start(
        [*SHADOWBLK, "serve", str(work / f"{name}.img"), "--size", f"{size_mib}M", "--name",
         name, "--listen", "127.0.0.1:0", "--state-dir", str(work / f"{name}.state"), *extra],
        name,
    )  # fmt: skip
    return procs.wait_ready(proc).split()[1], proc.pid


def measure(work: Path, rounds: int, seconds: float, size_mib: int) -> dict:
    procs = Processes(work)
    key = work / "key"
    key.write_text(os.urandom(32).hex())
    results: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[tuple[float, float]]] = {}  # µs per write: server, shadow
    try:
        shadow = procs.start(
            [*SHADOWBLK, "shadow", "--listen", "127.0.0.1:0", "--data-dir",
             str(work / "shadow"), "--hmac-key-file", str(key)],
            "shadow",
        )  # fmt: skip
        peer = ["--shadow", "127.0.0.1:" + procs.wait_ready(shadow).rsplit(":", 1)[1]]
        peer += ["--hmac-key-file", str(key)]
        servers = {
            "no shadow": start(procs, work, "plain", size_mib),
            "checksum map": start(procs, work, "crc", size_mib, "--checksums"),
            "async shadow": start(procs, work, "async", size_mib, "--mode", "async", *peer),
            "sync shadow": start(procs, work, "sync", size_mib, "--mode", "sync", *peer),
        }
        for i in range(rounds):
            for name, rw, bs, depth in WORKLOADS:
                order = CONFIGS[i % len(CONFIGS) :] + CONFIGS[: i % len(CONFIGS)]
                for config in order:
                    caught_up(work / "async.state")
                    caught_up(work / "sync.state")
                    url, pid = servers[config]
                    before = cpu_seconds(pid), cpu_seconds(shadow.pid)
                    iops, ios = fio(work, url, rw, bs, depth, size_mib, seconds)
                    caught_up(work / "async.state")  # the shipping of this run's writes
                    caught_up(work / "sync.state")
                    per = [
                        1e6 * (cpu_seconds(p) - b) / ios
                        for p, b in zip((pid, shadow.pid), before, strict=True)
                    ]
                    results.setdefault((name, config), []).append(iops)
                    cpu.setdefault((name, config), []).append((per[0], per[1]))
                    line = f"# round {i} {name:18} {config:13} {iops:9.0f} IOPS, CPU per write"
                    print(f"{line} {per[0]:.1f} µs server, {per[1]:.1f} µs shadow", file=sys.stderr)
    finally:
        procs.stop_all()
    return results, cpu


def report(results: dict, cpu: dict, rounds: int, seconds: float) -> None:
    print(f"fio (nbd engine), {rounds} interleaved rounds of {seconds:.0f} s, medians (IOPS)")
    print()
    heads = CONFIGS + [f"{c} / none" for c in CONFIGS[1:]]
    print("| workload | " + " | ".join(heads) + " |")
    print("|---" + "|---:" * len(heads) + "|")
    for name, *_ in WORKLOADS:
        med = [statistics.median(results[(name, c)]) for c in CONFIGS]
        cells = [f"{m:.0f}" for m in med] + [f"{m / med[0]:.2f}×" for m in med[1:]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for name, *_ in WORKLOADS:
        for config in CONFIGS[1:]:
            pairs = zip(results[(name, CONFIGS[0])], results[(name, config)], strict=True)
            per = ", ".join(f"{a / b:.2f}" for b, a in pairs)
            print(f"{name}: {config} / none per round: {per}")
    print()
    print("CPU per write (µs, utime + stime from fio's start to caught up after it, over fio's")
    print("I/Os; medians): server, shadow")
    print()
    print("| workload | " + " | ".join(CONFIGS) + " |")
    print("|---" + "|---:" * len(CONFIGS) + "|")
    for name, *_ in WORKLOADS:
        cells = []
        for config in CONFIGS:
            own = statistics.median(s for s, _ in cpu[(name, config)])
            theirs = statistics.median(t for _, t in cpu[(name, config)])
            cells.append(f"{own:.1f}, {theirs:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; ARGV None (as from tools.bench.run) means the defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=8, help="s per fio run (default 8)")
    parser.add_argument("--size", type=int, default=256, help="MiB per volume (default 256)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp)")
    args = parser.parse_args(argv or [])
    with scratch("bench-shadowcost-", args.dir) as work:
        results, cpu = measure(work, args.rounds, args.seconds, args.size)
    report(results, cpu, args.rounds, args.seconds)


if __name__ == "__main__":
    main(sys.argv[1:])
