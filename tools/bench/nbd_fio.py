"""NBD server benchmark: fio's nbd engine against shadowblk (tracking on and off), `nbdkit file`
and `qemu-nbd`, all on the same pre-filled file in the page cache, interleaved in one run.

    python -m tools.bench.nbd_fio [--runtime 10] [--rounds 1] [--size 1G] [--dir DIR]
        [--servers shadowblk,nbdkit,...] [--workloads 0,3] [--requests N] [--baseline DIR]

The servers run one after the other, in an order that changes per round (round_order): give
an even --rounds so that every pair of servers runs as often in one order as in the other.
Every server runs buffered through the page cache (nbdkit cache=default, qemu-nbd
--cache=writeback --aio=threads), so the comparison is between the servers, not cache modes.
Prints a markdown table of medians with ratios to nbdkit and tracking on/off.

Each case also reads the server process's CPU time (user + system, all its threads, from
/proc/PID/stat) before and after fio. With `--requests N` every case does N requests (N/64 for
1 MiB ones, fewer if the file ends first) instead of running for a time, and a second table
reports the server's CPU time per request: the figure a busy shared machine moves least (it does
not count the time a server waits for a CPU), so the one that can show a cost of a few per cent.

`--baseline DIR` adds the servers `baseline` and `baseline-notrack`: `shadowblk serve` run from
DIR, a copy of an older tree's `shadowblk/` package (with its built `_native` modules), so a
change is measured against the code before it in the same interleaved run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shadowblk.ports import free_port

ROOT = Path(__file__).resolve().parents[2]

WORKLOADS = [
    ("4k randwrite qd16", "randwrite", "4k", 16),
    ("4k randread qd16", "randread", "4k", 16),
    ("1M write qd4", "write", "1M", 4),
    ("1M read qd4", "read", "1M", 4),
    ("4k randwrite qd1", "randwrite", "4k", 1),
]
SERVERS = ["shadowblk", "shadowblk-notrack", "nbdkit", "qemu-nbd"]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_server(
    kind: str, image: Path, port: int, state: Path, baseline: Path | None = None
) -> subprocess.Popen:
    cwd = ROOT
    if kind.startswith(("shadowblk", "baseline")):
        if kind.startswith("baseline"):
            if baseline is None:
                raise ValueError(f"server {kind} needs --baseline DIR")
            cwd = baseline  # `python -m` puts the working folder first on sys.path
        argv = [sys.executable, "-m", "shadowblk.cli", "serve", str(image)]
        argv += ["--listen", f"127.0.0.1:{port}", "--name", "vol"]
        if kind in ("shadowblk", "baseline"):
            shutil.rmtree(state, ignore_errors=True)
            argv += ["--state-dir", str(state)]
    elif kind == "nbdkit":
        argv = ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "-e", "vol"]
        argv += ["file", str(image), "cache=default"]
    else:
        argv = ["qemu-nbd", "-t", "-p", str(port), "-b", "127.0.0.1", "-x", "vol", "-f", "raw"]
        argv += ["--cache=writeback", "--aio=threads", "--shared=8", str(image)]
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_port(port, proc)
    return proc


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def round_order(servers: list[str], rnd: int) -> list[str]:
    """Round RND's server order: rotated every two rounds and reversed every other round, so
    over each pair of rounds every server runs once before and once after every other. (A
    plain rotation put tracking on before tracking off in two of three rounds; in the quiet run
    of 2026-11-28 07:44 the earlier of the two was the slower one in all three rounds, whichever
    it was, and the median said tracking cost 14% on 1M writes.) Use an even number of rounds."""
    k = (rnd // 2) % len(servers)
    order = servers[k:] + servers[:k]
    return order[::-1] if rnd % 2 else order


@dataclass
class Result:
    iops: float
    mib_s: float
    p50_us: float
    p99_us: float
    requests: int = 0  # completed, as fio counts them (after the ramp)
    cpu_us: float = 0.0  # the server's CPU time per request (with --requests)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process PID so far, all threads (also the ended ones)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fio(
    port: int,
    rw: str,
    bs: str,
    depth: int,
    size: str,
    runtime: int,
    out: Path,
    requests: int = 0,
    offset: int = 0,
) -> Result:
    """One fio run over SIZE from OFFSET: for RUNTIME seconds after a 1 s ramp, or exactly
    REQUESTS requests."""
    limits = [f"--number_ios={requests}", f"--offset={offset}"] if requests else []
    if not requests:
        limits = [f"--runtime={runtime}", "--time_based", "--ramp_time=1", f"--offset={offset}"]
    argv = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri=nbd://127.0.0.1:{port}/vol",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={depth}",
        f"--size={size}",
        *limits,
        "--lat_percentiles=1",
        "--percentile_list=50:99",
        "--output-format=json",
        f"--output={out}",
    ]
    subprocess.run(
        argv, cwd=out.parent, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    job = json.loads(out.read_text())["jobs"][0]
    if job["job options"].get("ioengine") != "nbd" or job["error"]:
        raise RuntimeError(f"fio did not run the nbd engine cleanly: {job['error']}")
    side = job["write" if "write" in rw else "read"]
    pct = side["lat_ns"].get("percentile", {})
    return Result(
        side["iops"],
        side["bw_bytes"] / 2**20,
        pct.get("50.000000", 0) / 1000,
        pct.get("99.000000", 0) / 1000,
        side["total_ios"],
    )


def fill(image: Path, size: int) -> None:
    """Real data everywhere, so reads come from cached pages, not from holes."""
    chunk = os.urandom(1 << 20)
    with open(image, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)


def main(argv: list[str] | None = None) -> None:
    """Run the comparison; ARGV None (as from tools.bench.run) means the defaults."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--workloads", default="all", help="comma-separated indexes, or all")
    ap.add_argument("--requests", type=int, default=0, help="fixed requests per case (4 KiB)")
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a folder holding an older shadowblk/ package: adds baseline, baseline-notrack",
    )
    args = ap.parse_args(argv or [])
    servers = args.servers.split(",")
    if args.baseline is not None:
        if not (args.baseline / "shadowblk" / "cli").is_dir():
            ap.error(f"--baseline {args.baseline}: no shadowblk/ package there")
        servers += [s for s in ("baseline", "baseline-notrack") if s not in servers]
    workloads = (
        WORKLOADS
        if args.workloads == "all"
        else [WORKLOADS[int(i)] for i in args.workloads.split(",")]
    )
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # run the cleanup below on TERM
    work = Path(tempfile.mkdtemp(prefix="nbdbench-", dir=args.dir))
    image, state = work / "vol.img", work / "state"
    results: dict[tuple[str, str], list[Result]] = {}
    try:
        fill(image, size)
        for rnd in range(args.rounds):
            for name, rw, bs, depth in workloads:
                order = round_order(servers, rnd)
                for kind in order:
                    port = free_port()
                    proc = start_server(kind, image, port, state, args.baseline)
                    os.sync()  # no server inherits the previous one's dirty pages
                    requests = args.requests // 64 if bs == "1M" else args.requests
                    try:
                        cpu = cpu_seconds(proc.pid)
                        res = run_fio(
                            port,
                            rw,
                            bs,
                            depth,
                            args.size,
                            args.runtime,
                            work / "fio.json",
                            requests,
                        )
                        if requests:
                            res.cpu_us = (cpu_seconds(proc.pid) - cpu) * 1e6 / max(res.requests, 1)
                    finally:
                        stop_server(proc)
                    results.setdefault((name, kind), []).append(res)
                    print(
                        f"# round {rnd} {name:18} {kind:18} {res.iops:9.0f} IOPS "
                        f"{res.mib_s:8.1f} MiB/s p50 {res.p50_us:7.1f} us p99 {res.p99_us:7.1f} us"
                        f" cpu {res.cpu_us:6.1f} us/req",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, servers, workloads)
    report_rounds(results, servers, workloads)
    if args.requests:
        report_cpu(results, servers, workloads)


def report_cpu(results, servers, workloads) -> None:
    """Server CPU µs per request: medians, and tracking on / off per round (the spread)."""
    print()
    print("| workload, server CPU per request | " + " | ".join(servers) + " | on / off by round |")
    print("|---" * (len(servers) + 2) + "|")
    for name, *_ in workloads:
        cells = [
            f"{statistics.median(r.cpu_us for r in results[(name, k)]):.1f} µs" for k in servers
        ]
        ratios = ""
        if {"shadowblk", "shadowblk-notrack"} <= set(servers):
            pairs = zip(
                results[(name, "shadowblk")], results[(name, "shadowblk-notrack")], strict=True
            )
            per = sorted(on.cpu_us / off.cpu_us for on, off in pairs)
            ratios = (
                f"median {statistics.median(per):.3f} (" + ", ".join(f"{x:.2f}" for x in per) + ")"
            )
        print(f"| {name} | " + " | ".join(cells) + f" | {ratios} |")


def report_rounds(results, servers, workloads) -> None:
    """Each server's ratio to nbdkit round by round (the same round's cases ran minutes apart
    at most, so these show the spread the medians hide)."""
    if "nbdkit" not in servers:
        return
    others = [k for k in servers if k != "nbdkit"]
    print()
    print("| workload, ratio to nbdkit by round | " + " | ".join(others) + " |")
    print("|---" * (len(others) + 1) + "|")
    for name, _, bs, _ in workloads:
        attr = "mib_s" if bs == "1M" else "iops"
        base = [getattr(r, attr) for r in results[(name, "nbdkit")]]
        cells = []
        for kind in others:
            per = [getattr(r, attr) / b for r, b in zip(results[(name, kind)], base, strict=True)]
            cells.append(", ".join(f"{x:.2f}" for x in per))
        print(f"| {name} | " + " | ".join(cells) + " |")


def report(results, servers, workloads) -> None:
    def med(name: str, kind: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in results[(name, kind)])

    print("| workload | " + " | ".join(servers) + " | shadowblk / nbdkit | tracking on / off |")
    print("|---" * (len(servers) + 3) + "|")
    for name, _, bs, _ in workloads:
        attr = "mib_s" if bs == "1M" else "iops"
        unit = "MiB/s" if bs == "1M" else "IOPS"
        cells = [f"{med(name, k, attr):.0f} {unit}" for k in servers]
        ratio = (
            f"{med(name, 'shadowblk', attr) / med(name, 'nbdkit', attr):.2f}×"
            if {"shadowblk", "nbdkit"} <= set(servers)
            else "–"
        )
        track = (
            f"{med(name, 'shadowblk', attr) / med(name, 'shadowblk-notrack', attr):.2f}×"
            if {"shadowblk", "shadowblk-notrack"} <= set(servers)
            else "–"
        )
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} | {track} |")
        if name.endswith("qd1"):
            lat = [f"{med(name, k, 'p50_us'):.0f}/{med(name, k, 'p99_us'):.0f} µs" for k in servers]
            print(f"| {name} latency p50/p99 | " + " | ".join(lat) + " | | |")


if __name__ == "__main__":
    main(sys.argv[1:])
