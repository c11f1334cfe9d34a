"""The device-mapper table swap's pause against the userspace router's, many swaps in one guest.

    python -m tools.bench.dm_pause [--rounds 10] [--settle 1.0] [--append ARGS] [--trace]
        [--json] [--dir DIR] [--save DIR]

One kernel-lab guest (QEMU TCG, tools/kernel_lab) runs `shadowblk attach --dm` and the router
(`attach --listen`, a kernel /dev/nbdN on it) over two exports of one file on the host: A
(`shadowblk serve`) and B (`nbdkit file cache=none`). Each round repoints both, one after the
other under the same QD1 O_DIRECT writer (tools/bench/dm_pause_guest.py), A->B then B->A, the
path that goes first alternating. Per swap: the dm pause (suspend -> resume, and each part;
the attach's own clock), the router's gate-closed time and pause, and the writer's slowest
write around the swap, all taken in the guest. Reports medians and maxima, and the ratio of
medians (issue 10's target: the dm pause <= 3x the router's); --json adds every swap. A swap
whose writes failed fails the run, and the guest kernel's nbd/dm/I/O-error lines are printed.
Guest kernel arguments go in with --append (`rcupdate.rcu_expedited=1`: the swap's SRCU/RCU
grace periods go expedited).
--trace records the kernel's own durations of the swap's steps (ftrace function_graph on a few
dm, nbd and RCU functions, with absolute times, and the failed block requests) and reports them
too; --save DIR keeps the guest's console and that trace. `--append loglevel=7` puts the
kernel's info lines on the console (a write to a device with no capacity yet: "attempt to
access beyond end of device"). A single boot takes a few minutes under TCG.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

from tests.kernel.lab_run import switch_servers
from tests.procs import Processes
from tools.bench.workdir import scratch
from tools.kernel_lab import run_guest
from tools.kernel_lab.initramfs import REPO

MIB = 1 << 20
TRACED = ("dev_suspend", "dm_suspend", "dm_resume", "dm_swap_table", "dm_table_destroy",
          "dm_kobject_uevent", "synchronize_srcu", "synchronize_rcu_expedited",
          "synchronize_rcu", "dm_table_set_restrictions", "nbd_start_device", "nbd_clear_sock",
          "nbd_bdev_reset", "nbd_disconnect")  # fmt: skip

GUEST_SCRIPT = """#!/bin/sh
# the dm attach and the router, both on A, the driver, then both stopped (SIGTERM)
set -eu
sbk() { KLAB_CWD=$REPO klab-chroot .venv/bin/python -m shadowblk.cli "$@"; }
if [ "$TRACE" = 1 ]; then
    t=/sys/kernel/tracing
    mount -t tracefs nodev $t
    for f in $TRACED; do echo "$f" >>$t/set_ftrace_filter 2>/dev/null || true; done
    echo function_graph >$t/current_tracer
    echo 1 >$t/options/funcgraph-tail
    echo 1 >$t/options/funcgraph-abstime
    echo 4096 >$t/buffer_size_kb
    # failed requests, with the time they failed at
    echo 'error != 0' >$t/events/block/block_rq_complete/filter
    echo 1 >$t/events/block/block_rq_complete/enable
fi
sbk attach vol --dm vm-vol --upstream "$A" --control 127.0.0.1:7001 >/out/dm.out 2>/out/dm.err &
dm=$!
sbk attach vol --listen 127.0.0.1:7010 --upstream "$A" --control 127.0.0.1:7002 \\
    >/out/router.out 2>/out/router.err &
router=$!
trap 'kill $dm $router 2>/dev/null || true' EXIT
KLAB_CWD=$REPO klab-chroot .venv/bin/python -m tools.bench.dm_pause_guest /mnt "$A" "$B" \\
    "$ROUNDS" "$SETTLE"
kill $dm $router
wait $dm && wait $router
if [ "$TRACE" = 1 ]; then echo 0 >$t/tracing_on; cat $t/trace >/out/trace.txt; fi
"""

# function_graph with funcgraph-tail: "0) + 12.345 us | } /* dm_swap_table [dm_mod] */" or a
# leaf "0)   3.456 us | dm_kobject_uevent [dm_mod]();"
TRACE_LINE = re.compile(r"([\d.]+) us\s*\|\s*(?:\}\s*/\*\s*(\w+)|(\w+)(?: \[\w+\])?\(\);)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=10, help="swaps per path (default 10)")
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds of writing before and after each swap (default 1.0)",
    )
    parser.add_argument(
        "--append",
        default="",
        metavar="ARGS",
        help="extra guest kernel arguments, e.g. rcupdate.rcu_expedited=1",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="ftrace the swap's kernel steps and report their durations",
    )
    parser.add_argument("--timeout", type=float, default=1500, help="guest run limit, s")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--dir", type=Path, help="scratch parent folder (default: temp)")
    parser.add_argument("--save", type=Path, metavar="DIR",
                        help="keep the guest's console and trace in DIR")  # fmt: skip
    args = parser.parse_args(argv or [])
    if args.rounds < 1 or args.settle <= 0:
        parser.error("--rounds must be >= 1 and --settle > 0")
    return args


def run(args: argparse.Namespace, work: Path) -> tuple[list[dict], str]:
    """The guest run: every swap's row, and the trace's text ('' without --trace)."""
    image = work / "vol.img"
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    procs = Processes(work)
    try:
        a, b = switch_servers(procs, image)
        env = {"A": f"nbd://10.0.2.2:{a}/vol", "B": f"nbd://10.0.2.2:{b}/vol",
               "ROUNDS": str(args.rounds), "SETTLE": str(args.settle), "REPO": str(REPO),
               "TRACE": "1" if args.trace else "0", "TRACED": " ".join(TRACED)}  # fmt: skip
        result = run_guest(GUEST_SCRIPT, [], args.timeout, work / "out", host_ports={},
                           env=env, host_root=True, append=args.append)  # fmt: skip
    finally:
        procs.stop_all()
    swaps = work / "out" / "swaps.json"
    rows = json.loads(swaps.read_text()) if swaps.exists() else []
    result.check()
    if any(r["errors"] or r["bad_blocks"] for r in rows):  # the guest kernel's word on them
        kernel = re.compile(r"nbd|device-mapper|I/O error|blk_")
        lines = [line for line in result.console.splitlines() if kernel.search(line)]
        print("\n".join(lines), file=sys.stderr)
    trace = work / "out" / "trace.txt"
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / "console.log").write_text(result.console)
        if trace.exists():
            (args.save / "trace.txt").write_text(trace.read_text())
    return rows, trace.read_text() if trace.exists() else ""


def stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def trace_stats(text: str) -> dict[str, dict[str, float]]:
    """Each traced function's call count and median/max duration (ms) in the guest."""
    calls: dict[str, list[float]] = {}
    for line in text.splitlines():
        match = TRACE_LINE.search(line)
        if match:
            calls.setdefault(match[2] or match[3], []).append(float(match[1]) / 1000)
    return {name: {"calls": len(v), **stats(v)} for name, v in sorted(calls.items())}


def report(rows: list[dict], args: argparse.Namespace, load: tuple, trace: str) -> dict:
    by = {p: [r for r in rows if r["path"] == p] for p in ("dm", "router")}
    fields = {"dm": ("suspend_ms", "resume_ms", "pause_ms", "load_ms", "connect_ms",
                     "writer_max_ms", "writer_median_ms"),
              "router": ("gate_closed_ms", "pause_ms", "drain_ms", "connect_ms",
                         "writer_max_ms", "writer_median_ms")}  # fmt: skip
    out: dict = {"append": args.append, "rounds": args.rounds, "settle_s": args.settle,
                 "load_before": load[0], "load_after": load[1]}  # fmt: skip
    for path, keys in fields.items():
        columns = {k: [r[k] for r in by[path] if k in r] for k in keys}
        out[path] = {k: stats(v) for k, v in columns.items() if v}  # the attach's own fields
    dm, router = out["dm"], out["router"]
    gate = router["gate_closed_ms"]["median"]
    out["ratio_dm_pause_to_router_gate"] = (
        round(dm["pause_ms"]["median"] / gate, 2) if gate else None
    )
    out["ratio_writer_max_dm_to_router"] = round(
        dm["writer_max_ms"]["median"] / router["writer_max_ms"]["median"], 2
    )
    out["failures"] = [r for r in rows if r["errors"] or r["bad_blocks"]]
    if trace:
        out["kernel_ms"] = trace_stats(trace)
    out["swaps"] = rows
    return out


def show(rep: dict) -> None:
    print(f"guest kernel args: {rep['append'] or '(stock)'}; {rep['rounds']} swaps per path; "
          f"load average {rep['load_before']} -> {rep['load_after']}")  # fmt: skip
    for path in ("dm", "router"):
        for key, s in rep[path].items():
            print(f"  {path:6} {key:18} median {s['median']:8.1f}  max {s['max']:8.1f}")
    print(f"  ratio of medians: dm suspend->resume / router gate-closed = "
          f"{rep['ratio_dm_pause_to_router_gate']}; writer max dm / router = "
          f"{rep['ratio_writer_max_dm_to_router']}")  # fmt: skip
    for name, s in rep.get("kernel_ms", {}).items():
        print(f"  kernel {name:26} calls {s['calls']:4}  median {s['median']:7.1f}  "
              f"max {s['max']:7.1f} ms")  # fmt: skip
    for row in rep["failures"]:
        print(f"  FAILED: {row}")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; ARGV None (as from tools.bench.run) means the defaults."""
    args = parse_args(argv)
    before = tuple(round(x, 2) for x in os.getloadavg())
    with scratch("dm-pause-", args.dir) as work:
        rows, trace = run(args, work)
    after = tuple(round(x, 2) for x in os.getloadavg())
    rep = report(rows, args, (before, after), trace)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        show(rep)
    if rep["failures"]:
        raise SystemExit("a swap lost a write or failed one")


if __name__ == "__main__":
    main(sys.argv[1:])
