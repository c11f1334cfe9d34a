"""Emergency switchover, step by step: kill -9 of the primary's agent under fio, to the first
completed I/O.

    python -m tools.bench.emergency [--rounds 5] [--load-seconds 40] [--mode async|sync]
        [--norandommap] [--dir DIR] [--json]

Each round is a fresh fleet (tests/switchover_lab.py: a manager with --heartbeat-timeout 2,
agents s1 and s2 heartbeating every 0.3 s, a 256 MiB volume, primary s1, shadow s2) and
`attach` registered with the manager; fio 4k randwrite QD16 at 500 IOPS through attach (the
load of tools/bench/fleet_pause.py; fio's randwrite never sends a FLUSH, so every write stays
in the router's replay log) for LOAD_SECONDS, then kill -9 of s1's agent group. The timeline,
in seconds from the kill: the last heartbeat the manager had from s1 (negative), the manager's
detection, the generation raised (lease wait + CAS), the promotion, the repoint answered by
attach (its connect, drain and replay inside), and the first fio I/O completed after the kill.
To compare two trees, run it in each in turn (cwd decides which `shadowblk` the processes
import).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.agent_lab import wait_for
from tests.procs import Processes
from tests.switchover_lab import Fleet, start_attach, start_fleet
from tools.bench.fleet_pause import STRAGGLERS_S, fio
from tools.bench.switchover_pause import clat_log


def router_status(fleet: Fleet) -> dict:
    with urllib.request.urlopen(fleet.control + "/status", timeout=10) as reply:
        return json.load(reply)


def one(work: Path, load_s: float, mode: str, fio_args: list[str]) -> dict:
    """One fleet, one emergency: its timeline (seconds from the kill) and the router's figures."""
    procs, groups = Processes(work), []
    try:
        fleet = start_fleet(procs, groups, work, size=256 << 20, mode=mode)
        start_attach(procs, fleet)
        load = fio(work, fleet.attach_uri, 3600, "load", *fio_args)
        time.sleep(load_s)
        killed = time.time()
        os.killpg(fleet.agents["s1"].pid, signal.SIGKILL)
        wait_for(lambda: _moved(fleet), 60, "the emergency switchover")
        time.sleep(2)
        # a replay after the gate opened (this change) runs on: its figures once it ended
        wait_for(lambda: not router_status(fleet).get("replaying"), 60, "the replay")
        load.send_signal(signal.SIGINT)  # fio ends its time-based run
        load.wait(60)
        router = router_status(fleet)
        record = fleet.client.call("GET", "/v1/switchovers")["switchovers"][-1]
        last_hb = fleet.client.server("s1")["last_heartbeat"]
        log = clat_log(work / "load_clat.1.log")
    finally:
        procs.stop_all()
        for pgid in groups:  # the agents' children too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    steps = record["timings_ms"]
    end = last_hb + record["pause_seconds"] - killed  # the manager's record, from the kill
    detected = end - steps["total_ms"] / 1000
    cas = detected + (steps["lease_wait_ms"] + steps["cas_ms"]) / 1000
    promoted = cas + steps["promote_ms"] / 1000
    repointed = promoted + steps["repoint_ms"] / 1000
    after = [t for t, _ in log if t > killed + STRAGGLERS_S]
    repoint = router.get("last_repoint") or {}
    return {
        "last_heartbeat_s": last_hb - killed,
        "detected_s": detected,
        "cas_s": cas,
        "promoted_s": promoted,
        "repointed_s": repointed,
        "first_io_s": min(after) - killed,
        "lease_wait_ms": steps["lease_wait_ms"],
        "promote_ms": steps["promote_ms"],
        "repoint_ms": steps["repoint_ms"],
        "router_connect_ms": repoint.get("connect_ms"),
        "router_drain_ms": repoint.get("drain_ms"),
        "router_replay_ms": repoint.get("replay_ms"),
        "router_gate_closed_ms": repoint.get("gate_closed_ms"),
        "promote_steps_ms": (record.get("steps_ms") or {}).get("promote"),
        "replayed": router["replayed"],
        "replay_waits": router.get("replay_waits"),
        "errors": router["errors"],
        "requests": router["requests"],
        "load": os.getloadavg()[0],
    }


def _moved(fleet: Fleet) -> bool:
    records = fleet.client.call("GET", "/v1/switchovers")["switchovers"]
    return bool(records) and not records[-1]["planned"] and "timings_ms" in records[-1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--load-seconds", type=float, default=40.0, help="fio before the kill")
    ap.add_argument("--mode", choices=["async", "sync"], default="async")
    ap.add_argument(
        "--norandommap",
        action="store_true",
        help="fio picks blocks with replacement: it rewrites blocks it wrote before the kill, "
        "so some of its writes meet blocks still being replayed",
    )
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", action="store_true", help="one JSON object per round")
    args = ap.parse_args(argv if argv is not None else [])
    rows = []
    for r in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix=f"emergency{r}-", dir=args.dir))
        row = one(work, args.load_seconds, args.mode, ["--norandommap"] if args.norandommap else [])
        rows.append(row)
        if args.json:
            print(json.dumps({"tree": os.getcwd(), "mode": args.mode, **row}), flush=True)
    if args.json:
        return
    print("| figure, s from the kill (ms: durations) | median | max |\n|---|---|---|")
    for key in rows[0]:
        values = [row[key] for row in rows if isinstance(row[key], float | int)]
        if values:
            print(f"| {key} | {statistics.median(values):.3f} | {max(values):.3f} |")
    print(f"(rounds {args.rounds}; mode {args.mode}; cwd {os.getcwd()})")


if __name__ == "__main__":
    main(sys.argv[1:])
