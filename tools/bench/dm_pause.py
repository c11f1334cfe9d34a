"""The device-mapper table swap's pause against the userspace router's, many swaps in one guest.

    python -m tools.bench.dm_pause [--rounds 10] [--settle 1.0] [--swap both|one|two]
        [--append ARGS] [--trace] [--json] [--dir DIR] [--save DIR]

One kernel-lab guest (QEMU TCG, tools/kernel_lab) runs `shadowblk attach --dm` once per swap
kind measured (--swap both, the default: `--dm-swap one`, the table swapped by one resume ioctl
in which the kernel suspends, and `--dm-swap two`, a suspend ioctl then a resume ioctl) and the
router (`attach --listen`, a kernel /dev/nbdN on it), all over two exports of one file on the
host: A (`shadowblk serve`) and B (`nbdkit file cache=none`). Each round repoints every one of
them in turn under the same QD1 O_DIRECT writer (tools/bench/dm_pause_guest.py), A->B then
B->A, the path that goes first rotating. Per swap: the dm pause (first swap ioctl issued ->
resume returned, the attach's own clock; with two ioctls each part), the router's
gate-closed time and pause, the writer's slowest write in flight during the pause itself and
during the whole repoint call (which also connects and loads the table), and every path's
VM-visible pause by issue 7's definition (`vm_pause_ms`: the slowest write in flight during
the repoint call minus the slowest of the SETTLE s of writes before it, floored at 0;
tools/bench/dm_pause_guest.py), all taken in the guest. Reports medians and maxima, and per
dm swap kind the ratios of medians to the router's. Issue 10's target (the dm pause <= 3x
what the router achieves) is read two ways: the dm pause against the router's VM-visible
pause (issue 7's definition of the pause a switchover achieves; the primary reading) and
against the router's gate-closed time (the strict one). --json adds every swap and per-path
lists in round order. A swap whose writes failed fails the run, and the guest kernel's
nbd/dm/I/O-error lines are printed.
Guest kernel arguments go in with --append (`rcupdate.rcu_expedited=1`: the swap's SRCU/RCU
grace periods go expedited).
--trace records the kernel's own durations of the swap's steps (ftrace function_graph on a few
dm, nbd and RCU functions, with absolute times on the guest's monotonic clock, and the failed
block requests) and reports them per path whose pause they fell in; --save DIR keeps the
guest's console, that trace and the attaches' stderr.
`--append loglevel=7` puts the kernel's info lines on the console (a write to a device with no
capacity yet: "attempt to access beyond end of device"). A single boot takes a few minutes
under TCG.
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
from tools.bench.dm_pause_guest import CONTROL
from tools.bench.workdir import scratch
from tools.kernel_lab import run_guest
from tools.kernel_lab.initramfs import REPO

MIB = 1 << 20
TRACED = ("dev_suspend", "dm_suspend", "dm_resume", "dm_swap_table", "dm_table_destroy",
          "dm_kobject_uevent", "synchronize_srcu", "synchronize_rcu_expedited",
          "synchronize_rcu", "dm_table_set_restrictions", "nbd_start_device", "nbd_clear_sock",
          "nbd_bdev_reset", "nbd_disconnect")  # fmt: skip

GUEST_SCRIPT = """#!/bin/sh
# the dm attaches and the router, all on A, then the driver, which stops them (SIGTERM)
set -eu
sbk() { KLAB_CWD=$REPO klab-chroot .venv/bin/python -m shadowblk.cli "$@"; }
if [ "$TRACE" = 1 ]; then
    t=/sys/kernel/tracing
    mount -t tracefs nodev $t
    for f in $TRACED; do echo "$f" >>$t/set_ftrace_filter 2>/dev/null || true; done
    echo function_graph >$t/current_tracer
    echo 1 >$t/options/funcgraph-tail
    echo 1 >$t/options/funcgraph-abstime
    echo mono >$t/trace_clock # the clock of time.monotonic(): calls placed in a swap's pause
    echo 4096 >$t/buffer_size_kb
    # failed requests, with the time they failed at
    echo 'error != 0' >$t/events/block/block_rq_complete/filter
    echo 1 >$t/events/block/block_rq_complete/enable
fi
pids=""
{attaches}
trap 'kill $pids 2>/dev/null || true' EXIT
KLAB_CWD=$REPO klab-chroot .venv/bin/python -m tools.bench.dm_pause_guest /mnt "$A" "$B" \\
    "$ROUNDS" "$SETTLE" "$PATHS"
for pid in $pids; do wait $pid; done # the driver stopped them (SIGTERM): they must exit cleanly
if [ "$TRACE" = 1 ]; then echo 0 >$t/tracing_on; cat $t/trace >/out/trace.txt; fi
"""

SWAPS = {"both": ("one", "two"), "one": ("one",), "two": ("two",)}


def attaches(swaps: tuple[str, ...]) -> str:
    """The guest script's lines that start one `attach --dm` per swap kind, then the router."""
    started = [(f"dm-{swap}", f"--dm vm-{swap} --dm-swap {swap}") for swap in swaps]
    started.append(("router", "--listen 127.0.0.1:7010"))
    return "\n".join(
        f'sbk attach vol {how} --upstream "$A" --control {CONTROL[path]} '
        f'>/out/{path}.out 2>/out/{path}.err &\npids="$pids $!"'
        for path, how in started
    )


# function_graph with funcgraph-abstime and -tail: "  177.2 |  0) + 12.345 us | } /*
# dm_swap_table [dm_mod] */" or a leaf "  177.2 |  0)   3.456 us | dm_kobject_uevent [dm_mod]();"
# (the time stamp: the call's return)
TRACE_LINE = re.compile(
    r"^\s*([\d.]+) \|.*?([\d.]+) us\s*\|\s*(?:\}\s*/\*\s*(\w+)|(\w+)(?: \[\w+\])?\(\);)"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=10, help="swaps per path (default 10)")
    parser.add_argument(
        "--swap",
        choices=tuple(SWAPS),
        default="both",
        help="the dm swap kinds measured beside the router: one (a resume ioctl), two (suspend "
        "and resume ioctls), both (interleaved in the same boot; the default)",
    )
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
        kinds = SWAPS[args.swap]
        env = {"A": f"nbd://10.0.2.2:{a}/vol", "B": f"nbd://10.0.2.2:{b}/vol",
               "ROUNDS": str(args.rounds), "SETTLE": str(args.settle), "REPO": str(REPO),
               "TRACE": "1" if args.trace else "0", "TRACED": " ".join(TRACED),
               "PATHS": ",".join([f"dm-{kind}" for kind in kinds] + ["router"])}  # fmt: skip
        script = GUEST_SCRIPT.replace("{attaches}", attaches(kinds))
        result = run_guest(script, [], args.timeout, work / "out", host_ports={},
                           env=env, host_root=True, append=args.append)  # fmt: skip
    finally:
        procs.stop_all()
    out = work / "out"
    if args.save:  # also when the guest script failed
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / "console.log").write_text(result.console)
        for kept in [out / "trace.txt", *out.glob("*.err")]:
            if kept.exists():
                (args.save / kept.name).write_text(kept.read_text())
    rows = json.loads((out / "swaps.json").read_text()) if (out / "swaps.json").exists() else []
    result.check()
    if any(r["errors"] or r["bad_blocks"] for r in rows):  # the guest kernel's word on them
        kernel = re.compile(r"nbd|device-mapper|I/O error|blk_")
        lines = [line for line in result.console.splitlines() if kernel.search(line)]
        print("\n".join(lines), file=sys.stderr)
    trace = out / "trace.txt"
    return rows, trace.read_text() if trace.exists() else ""


def stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def trace_stats(text: str, rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Each traced function's call count and median/max duration (ms) in the guest, per path
    whose pause the call started in ("elsewhere": outside every pause)."""
    calls: dict[str, dict[str, list[float]]] = {}
    for line in text.splitlines():
        match = TRACE_LINE.search(line)
        if match:
            ms = float(match[2]) / 1000
            start = float(match[1]) - ms / 1000
            within = (r["path"] for r in rows if r["window"][0] - 0.001 <= start <= r["window"][1])
            path = next(within, "elsewhere")
            calls.setdefault(path, {}).setdefault(match[3] or match[4], []).append(ms)
    return {path: {name: {"calls": len(v), **stats(v)} for name, v in sorted(funcs.items())}
            for path, funcs in sorted(calls.items())}  # fmt: skip


WRITER = ("vm_pause_ms", "writer_base_max_ms", "writer_max_ms", "writer_max_in_pause_ms",
          "writer_median_ms")  # fmt: skip
FIELDS = {"dm": ("pause_ms", "suspend_ms", "resume_ms", "load_ms", "connect_ms", *WRITER),
          "router": ("gate_closed_ms", "pause_ms", "drain_ms", "connect_ms", *WRITER)}  # fmt: skip
# what each dm kind is set against the router by: (dm figure, router figure), medians; the
# first two: issue 10's target, its primary reading (the router's pause by issue 7's
# definition) and its strict one (the router's gate-closed time)
RATIOS = {"pause_to_vm_pause": ("pause_ms", "vm_pause_ms"),
          "pause_to_gate_closed": ("pause_ms", "gate_closed_ms"),
          "vm_pause": ("vm_pause_ms", "vm_pause_ms"),
          "writer_max_in_pause": ("writer_max_in_pause_ms", "writer_max_in_pause_ms"),
          "writer_max_around_call": ("writer_max_ms", "writer_max_ms")}  # fmt: skip


PER_ROUND = ("vm_pause_ms", "writer_base_max_ms", "writer_max_ms")


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def report(rows: list[dict], args: argparse.Namespace, load: tuple, trace: str) -> dict:
    out: dict = {"append": args.append, "rounds": args.rounds, "settle_s": args.settle,
                 "swap": args.swap, "load_before": load[0], "load_after": load[1]}  # fmt: skip
    paths = [f"dm-{swap}" for swap in SWAPS[args.swap]] + ["router"]
    for path in paths:
        keys = FIELDS["router" if path == "router" else "dm"]
        columns = {k: [r[k] for r in rows if r["path"] == path and k in r] for k in keys}
        out[path] = {k: stats(v) for k, v in columns.items() if v}  # the attach's own fields
    router = out["router"]
    out["ratios_to_router"] = {
        path: {name: ratio(out[path][dm]["median"], router[rt]["median"])
               for name, (dm, rt) in RATIOS.items()}
        for path in paths[:-1]
    }  # fmt: skip
    out["per_round"] = {path: {k: [r[k] for r in rows if r["path"] == path]
                               for k in (*PER_ROUND, "gate_closed_ms" if path == "router" else
                                         "pause_ms")}
                        for path in paths}  # fmt: skip
    out["failures"] = [r for r in rows if r["errors"] or r["bad_blocks"]]
    if trace:
        out["kernel_ms"] = trace_stats(trace, rows)
    out["swaps"] = rows
    return out


def show(rep: dict) -> None:
    print(f"guest kernel args: {rep['append'] or '(stock)'}; {rep['rounds']} swaps per path; "
          f"load average {rep['load_before']} -> {rep['load_after']}")  # fmt: skip
    for path in [*rep["ratios_to_router"], "router"]:
        for key, s in rep[path].items():
            print(f"  {path:7} {key:23} median {s['median']:8.1f}  max {s['max']:8.1f}")
    for path, ratios in rep["ratios_to_router"].items():
        print(f"  ratio of medians, {path} / router: dm pause (swap ioctls) / router's VM-visible "
              f"pause (issue 7) {ratios['pause_to_vm_pause']}; / router's gate-closed time "
              f"{ratios['pause_to_gate_closed']}; VM-visible pause / VM-visible pause "
              f"{ratios['vm_pause']}; writer's slowest write in the pause "
              f"{ratios['writer_max_in_pause']}, around the repoint call "
              f"{ratios['writer_max_around_call']}")  # fmt: skip
    for path, funcs in rep.get("kernel_ms", {}).items():
        for name, s in funcs.items():
            print(f"  kernel {path:9} {name:26} calls {s['calls']:4}  median {s['median']:7.2f}"
                  f"  max {s['max']:7.2f} ms")  # fmt: skip
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
