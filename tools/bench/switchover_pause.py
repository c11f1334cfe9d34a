"""Switchover pause of `shadowblk attach` under fio load, and the router's overhead.

    python -m tools.bench.switchover_pause [--repoints 20] [--every 1.0] [--rounds 3] [--dir DIR]
    python -m tools.bench.switchover_pause --fleet [--switchovers 20]   (tools/bench/fleet_pause.py)

Two upstreams export one file: `shadowblk serve` (A) and `nbdkit file cache=none` (B). The router
starts in front of A. Overhead: fio 4k randwrite, iodepth 16, 5 s runs, direct to A and through
the router (to A), interleaved ROUNDS times; the IOPS ratio of the medians. Pause: a baseline fio
run with no repoint (its max completion latency), then a run of the same load during which the
router is repointed REPOINTS times, alternately to B and A: the router's own measurement (first
request queued -> queue released), and fio's max completion latency in a window around each
repoint (from its per-I/O latency log) minus the baseline's max. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.procs import SHADOWBLK, Processes, free_port

LOAD = ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=256M", "--randrepeat=0"]


def fio(cwd: Path, uri: str, seconds: float, name: str, lat_log: bool = False) -> subprocess.Popen:
    argv = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", *LOAD, "--time_based",
            f"--runtime={seconds}", "--output-format=json",
            f"--output={cwd / name}.json"]  # fmt: skip
    if lat_log:
        argv += [f"--write_lat_log={cwd / name}", "--log_avg_msec=0", "--log_unix_epoch=1"]
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL)


def finish(cwd: Path, proc: subprocess.Popen, name: str) -> dict:
    """Wait for fio; its job's results (errors are fatal: the benchmark is of a correct run)."""
    if proc.wait(timeout=600):
        sys.exit(f"fio {name} failed with {proc.returncode}")
    job = json.loads((cwd / f"{name}.json").read_text())["jobs"][0]
    if job["error"]:
        sys.exit(f"fio {name}: error {job['error']}")
    return job


def repoint(control: str, uri: str, generation: int) -> dict:
    body = json.dumps({"uri": uri, "generation": generation}).encode()
    req = urllib.request.Request(control + "/repoint", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=60) as reply:
        return json.load(reply)


def clat_log(path: Path) -> list[tuple[float, float]]:
    """(completion time, s since the epoch; completion latency, ms) of every I/O."""
    rows = []
    for line in path.read_text().splitlines():
        fields = line.split(",")
        rows.append((int(fields[0]) / 1000, int(fields[1]) / 1e6))
    return rows


def start_upstreams(procs: Processes, image: Path) -> tuple[str, str]:
    serve = procs.start([*SHADOWBLK, "serve", str(image), "--listen", "127.0.0.1:0", "--name",
                         "vol", "--size", "1G"], "serve")  # fmt: skip
    serve_uri = procs.wait_ready(serve).split()[1]
    port = free_port()
    kit = procs.start(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-e", "vol", "file",
                       str(image), "cache=none"], "nbdkit")  # fmt: skip
    kit_uri = f"nbd://127.0.0.1:{port}/vol"
    while subprocess.run(["nbdinfo", "--size", kit_uri], capture_output=True).returncode:
        if kit.poll() is not None:
            sys.exit("nbdkit did not start")
        time.sleep(0.05)
    return serve_uri, kit_uri


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; ARGV None (as from tools.bench.run) means the defaults."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repoints", type=int, default=20)
    ap.add_argument("--every", type=float, default=1.0, help="seconds between repoints")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--fleet", action="store_true", help="real switchovers through a manager")
    ap.add_argument("--switchovers", type=int, default=20, help="with --fleet")
    args = ap.parse_args(argv or [])
    work = Path(tempfile.mkdtemp(prefix="swbench-", dir=args.dir))
    if args.fleet:
        from tools.bench.fleet_pause import run

        run(work, args.switchovers)
        return
    procs = Processes(work)
    try:
        serve_uri, kit_uri = start_upstreams(procs, work / "vol.img")
        ctl = f"127.0.0.1:{free_port()}"
        attach = procs.start([*SHADOWBLK, "attach", "vol", "--listen", "127.0.0.1:0",
                              "--upstream", serve_uri, "--control", ctl], "attach")  # fmt: skip
        router_uri, control = procs.wait_ready(attach).split()[1], f"http://{ctl}"

        iops: dict[str, list[float]] = {"direct": [], "router": []}
        for r in range(args.rounds):
            for kind, uri in (("direct", serve_uri), ("router", router_uri)):
                job = finish(work, fio(work, uri, 5, f"{kind}{r}"), f"{kind}{r}")
                iops[kind].append(job["write"]["iops"])

        seconds = args.repoints * args.every + 2
        base = finish(work, fio(work, router_uri, seconds, "base"), "base")
        base_max = base["write"]["clat_ns"]["max"] / 1e6
        base_p999 = base["write"]["clat_ns"]["percentile"]["99.900000"] / 1e6
        run = fio(work, router_uri, seconds, "moves", lat_log=True)
        windows, router_pauses = [], []
        for i in range(args.repoints):
            time.sleep(args.every if i else 1.0)
            before = time.time()
            answer = repoint(control, kit_uri if i % 2 == 0 else serve_uri, i + 1)
            windows.append((before, time.time()))
            router_pauses.append(answer["pause_ms"])
        finish(work, run, "moves")
        log = clat_log(work / "moves_clat.1.log")
        fio_worst = []
        for before, after in windows:  # an I/O held by a repoint completes in its window
            lo, hi = before - 0.02, after + 0.05
            worst = max((lat for t, lat in log if lo <= t <= hi), default=0.0)
            fio_worst.append(worst)
    finally:
        procs.stop_all()
        (work / "vol.img").unlink(missing_ok=True)  # 256 MiB written; the logs stay
    med = {k: statistics.median(v) for k, v in iops.items()}
    print("| figure | value |\n|---|---|")
    print(f"| repoints under 4k randwrite QD16 | {args.repoints} |")
    print(f"| router pause median / max (ms) | {statistics.median(router_pauses):.2f} / "
          f"{max(router_pauses):.2f} |")  # fmt: skip
    extra = [max(w - base_max, 0.0) for w in fio_worst]
    print(f"| fio max clat in a repoint's window, median / max (ms) | "
          f"{statistics.median(fio_worst):.2f} / {max(fio_worst):.2f} |")  # fmt: skip
    print(f"| the same minus the baseline run's max, median / max (ms) | "
          f"{statistics.median(extra):.2f} / {max(extra):.2f} |")  # fmt: skip
    print(f"| baseline run (no repoint): max / p99.9 clat (ms) | {base_max:.2f} / "
          f"{base_p999:.2f} |")  # fmt: skip
    print(f"| IOPS direct / router (median of {args.rounds}) | {med['direct']:.0f} / "
          f"{med['router']:.0f} |")  # fmt: skip
    print(f"| router / direct IOPS ratio | {med['router'] / med['direct']:.3f} |")
    print(f"| raw IOPS direct | {', '.join(f'{x:.0f}' for x in iops['direct'])} |")
    print(f"| raw IOPS router | {', '.join(f'{x:.0f}' for x in iops['router'])} |")
    print(f"(work dir {work}; cpus {os.cpu_count()})")


if __name__ == "__main__":
    main(sys.argv[1:])
