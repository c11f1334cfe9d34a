"""`make bench`: run the benchmark modules one after the other and print their figures.

    python -m tools.bench.run             every benchmark in BENCHMARKS
    python -m tools.bench.run fastpath    only the named ones

Each module in BENCHMARKS exposes `main() -> None`, which prints its own report. Add yours to the
list; keep each module's run to a minute or two, since `make bench` runs them all.
"""

from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = [
    "tools.bench.fastpath",
    "tools.bench.scrub",
    "tools.bench.nbd_fio",
    "tools.bench.shadow_cost",
    "tools.bench.track_cost",
    "tools.bench.replication",
    "tools.bench.switchover_pause",
    "tools.bench.emergency",
    "tools.bench.resync",
    "tools.bench.sync_latency",
    "tools.bench.dm_pause",  # a QEMU TCG guest: 5-10 minutes
]


def main(argv: list[str] | None = None) -> None:
    wanted = sys.argv[1:] if argv is None else argv
    modules = [m for m in BENCHMARKS if not wanted or m.rsplit(".", 1)[-1] in wanted]
    unknown = set(wanted) - {m.rsplit(".", 1)[-1] for m in BENCHMARKS}
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    for name in modules:
        print(f"=== {name}", flush=True)
        started = time.perf_counter()
        importlib.import_module(name).main()
        print(f"=== {name} done in {time.perf_counter() - started:.0f} s\n", flush=True)


if __name__ == "__main__":
    main()
