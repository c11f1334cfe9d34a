"""The pause of real switchovers through the manager, under fio load through `attach`.

    python -m tools.bench.switchover_pause --fleet [--switchovers 20] [--dir DIR]

A manager, two agents, a 256 MiB async volume (primary s1, shadow s2), `attach` registered with
the manager. Baseline: fio 4k randwrite QD16 at 500 IOPS (a rate the shadow keeps up with on a
small shared machine: async lag under 1 s, the issue's condition) for 10 s through attach, no
switchover (its max completion latency). Then the same load while SWITCHOVERS planned
switchovers go back and forth (each once the shadow is in step; a 409 is counted and
skipped): per switchover, the manager's pause (gate + CAS + fence + promote + repoint), the
router's own pause, and fio's max completion latency among the I/Os completing during the
switchover call, minus the baseline's max. Last, kill -9 of the primary's agent group: the
time from the kill to the first I/O completed after it (emergency switchover;
--heartbeat-timeout 2 s). Prints a markdown table.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

from shadowblk.manager.client import ManagerError
from tests.agent_lab import wait_for
from tests.procs import Processes
from tests.switchover_lab import Fleet, start_attach, start_fleet
from tools.bench.switchover_pause import clat_log, finish

LOAD = [
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=16",
    "--size=256M",
    "--randrepeat=0",
    "--rate_iops=500",
]  # 2 MB/s: the shadow keeps up (async lag under 1 s)
STRAGGLERS_S = 0.2  # I/Os completing this soon after the kill were answered before it


def fio(cwd: Path, uri: str, seconds: float, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", *LOAD, *extra, "--time_based",
         f"--runtime={seconds}", "--output-format=json", f"--output={cwd / name}.json",
         f"--write_lat_log={cwd / name}", "--log_avg_msec=0", "--log_unix_epoch=1"],
        cwd=cwd, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def run(work: Path, switchovers: int) -> None:
    procs, groups = Processes(work), []
    try:
        fleet = start_fleet(procs, groups, work, size=256 << 20)
        start_attach(procs, fleet)
        base = finish(work, fio(work, fleet.attach_uri, 10, "base"), "base")
        base_max = base["write"]["clat_ns"]["max"] / 1e6
        load = fio(work, fleet.attach_uri, 3600, "moves")
        time.sleep(2)
        windows, records, refused = [], [], []
        for _ in range(switchovers):
            wait_for(fleet.in_step, 120, "the shadow in step")
            before = time.time()
            try:
                records.append(fleet.switchover(reason="benchmark"))
            except ManagerError as err:  # 409: the shadow lags too much right now
                refused.append(str(err))
                continue
            windows.append((before, time.time()))
        wait_for(fleet.in_step, 120, "the shadow in step")
        time.sleep(2)
        killed = time.time()
        os.killpg(fleet.agents[fleet.primary()].pid, signal.SIGKILL)
        wait_for(lambda: _moved(fleet), 60, "the emergency switchover")
        time.sleep(2)
        load.send_signal(signal.SIGINT)  # fio ends its time-based run (exit 128, no JSON)
        load.wait(60)
        with urllib.request.urlopen(fleet.control + "/status", timeout=10) as reply:
            router = json.load(reply)  # every I/O went through it: its errors are fio's
        log = clat_log(work / "moves_clat.1.log")
        emergency = fleet.client.call("GET", "/v1/switchovers")["switchovers"][-1]
    finally:
        procs.stop_all()
        for pgid in groups:  # the agents' children too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    worst = [max((lat for t, lat in log if lo <= t <= hi), default=0.0) for lo, hi in windows]
    extra = [max(w - base_max, 0.0) for w in worst]
    pauses = [r["pause_seconds"] * 1000 for r in records]
    held = [r["router_pause_ms"] or 0.0 for r in records]
    resumed = min(t for t, _ in log if t > killed + STRAGGLERS_S) - killed
    print("| figure | value |\n|---|---|")
    print(f"| planned switchovers under 4k randwrite QD16, done / refused (409) | "
          f"{len(records)} / {len(refused)} |")  # fmt: skip
    print(f"| manager's pause (gate+CAS+fence+promote+repoint), median / max (ms) | "
          f"{statistics.median(pauses):.1f} / {max(pauses):.1f} |")  # fmt: skip
    print(f"| router's pause, median / max (ms) | {statistics.median(held):.1f} / "
          f"{max(held):.1f} |")  # fmt: skip
    print(f"| fio max clat during a switchover, median / max (ms) | "
          f"{statistics.median(worst):.1f} / {max(worst):.1f} |")  # fmt: skip
    print(f"| the same minus the baseline's max, median / max (ms) | "
          f"{statistics.median(extra):.1f} / {max(extra):.1f} |")  # fmt: skip
    print(f"| baseline max clat (ms) | {base_max:.1f} |")
    for step in ("gate_ms", "cas_ms", "fence_ms", "compare_ms", "handover_ms", "promote_ms",
                 "repoint_ms"):  # fmt: skip
        _row(step, [r["timings_ms"].get(step, 0.0) for r in records])
    for step in ("dispatch_ms", "release_ms", "recover_ms", "take_ms", "go_ms", "ready_ms",
                 "lease_ms"):  # fmt: skip
        _row(f"promote: {step}", [_promote_steps(r).get(step, 0.0) for r in records])
    _row("fence: the old primary's serve (fence_serve_ms)",
         [(r.get("steps_ms") or {}).get("fence_serve_ms") or 0.0 for r in records])  # fmt: skip
    _row("drain before the pause: rounds", [len((r.get("steps_ms") or {}).get(
        "drain_rounds_ms") or []) for r in records], "")  # fmt: skip
    _row("last delta (KiB)", [r.get("delta_bytes", 0) / 1024 for r in records], "")
    no_compare = [
        r["pause_seconds"] * 1000 - r["timings_ms"].get("compare_ms", 0.0) for r in records
    ]
    _row("manager's pause without compare_ms", no_compare)
    print(f"| emergency: kill -9 -> first completed I/O (s) | {resumed:.2f} |")
    print(f"| emergency: record | {emergency['timings_ms']} |")
    print(f"| emergency: promotion's steps | {_promote_steps(emergency)} |")
    print(f"| attach: requests / errors / retried / replayed | {router['requests']} / "
          f"{router['errors']} / {router['retries']} / {router['replayed']} |")  # fmt: skip
    print(f"(work dir {work}; cpus {os.cpu_count()}; load {os.getloadavg()[0]:.1f})")


def _row(what: str, values: list[float], unit: str = " (ms)") -> None:
    print(f"| {what}, median / max{unit} | {statistics.median(values):.1f} / {max(values):.1f} |")


def _promote_steps(record: dict) -> dict[str, float]:
    """The target agent's own timings of the promotion (`steps_ms` of the record)."""
    return (record.get("steps_ms") or {}).get("promote") or {}


def _moved(fleet: Fleet) -> bool:
    """The last switchover recorded is the emergency one."""
    records = fleet.client.call("GET", "/v1/switchovers")["switchovers"]
    return bool(records) and not records[-1]["planned"]
