"""Scrub throughput against `dd if=FILE of=/dev/null bs=1M` reading the same file in the same
run, the two interleaved round by round so a shared machine's noise hits both alike.

Cold: the file's pages are dropped from the page cache (posix_fadvise DONTNEED on that file
only) before each run, so both read the disk. Warm: dd reads the file first, so both read the
page cache. Scrub runs as `shadowblk scrub` does (it drops what it read from the disk and
leaves what was cached). Target (issue 5): scrub >= 0.9x dd.

    python -m tools.bench.run scrub              (SHADOWBLK_BENCH_GIB=N sets the file size)
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from shadowblk.integrity.checksum_map import ChecksumMap
from shadowblk.integrity.scrub import ScanOptions, Side, scan

GIB = 1 << 30
ROUNDS = 5


def make_file(path: Path, size: int) -> None:
    """Incompressible, non-sparse data (a 64 MiB random pattern, each copy salted)."""
    pattern = np.random.default_rng(2026).integers(0, 256, 64 << 20, dtype=np.uint8)
    with path.open("wb") as f:
        for i in range(size // pattern.size):
            pattern[:8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)
            f.write(pattern.tobytes())
        os.fsync(f.fileno())


def drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_dd(path: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one dd run."""
    cpu, started = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
    return time.perf_counter() - started, _cpu(resource.RUSAGE_CHILDREN) - cpu


def run_scrub(side: Side, options: ScanOptions) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one scan of the whole file."""
    cpu, started = _cpu(resource.RUSAGE_SELF), time.perf_counter()
    bad = scan(side, options)
    seconds, cpu = time.perf_counter() - started, _cpu(resource.RUSAGE_SELF) - cpu
    if bad:
        raise AssertionError(f"the benchmark file changed: {len(bad)} bad blocks")
    return seconds, cpu


def measure(side: Side, cold: bool) -> dict[str, list[tuple[float, float]]]:
    """(bytes/s, CPU seconds per GiB) of dd and scrub (cold: also scrub with O_DIRECT),
    ROUNDS rounds, the order rotating from round to round."""
    runs = {
        "dd": lambda: run_dd(side.image),
        "scrub": lambda: run_scrub(side, ScanOptions()),
    }
    if cold:
        runs["scrub --direct"] = lambda: run_scrub(side, ScanOptions(direct=True))
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(ROUNDS):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            if cold:
                drop_from_cache(side.image)
            else:
                run_dd(side.image)  # make sure every page is cached
            seconds, cpu = runs[name]()
            rates[name].append((side.map.size / seconds, cpu * GIB / side.map.size))
    return rates


def main() -> None:
    size = int(float(os.environ.get("SHADOWBLK_BENCH_GIB", "2")) * GIB)
    with tempfile.TemporaryDirectory(dir=os.environ.get("SHADOWBLK_BENCH_DIR", "/var/tmp")) as d:
        image = Path(d) / "volume.img"
        make_file(image, size)
        cmap = ChecksumMap.build(image, Path(d) / "volume.map")
        with cmap:
            side = Side("primary", image, cmap)
            print(f"file {size / GIB:.1f} GiB, {ROUNDS} interleaved rounds, medians (best)")
            for label, cold in (("cold cache", True), ("warm cache", False)):
                rates = measure(side, cold)
                dd = statistics.median(rate for rate, _ in rates["dd"])
                dd_cpu = statistics.median(cpu for _, cpu in rates["dd"])
                print(f"  {label}:")
                for name, runs in rates.items():
                    median = statistics.median(rate for rate, _ in runs)
                    best = max(rate for rate, _ in runs)
                    cpu = statistics.median(cpu for _, cpu in runs)
                    print(
                        f"    {name:<15} {median / 1e6:7.0f} MB/s (best {best / 1e6:5.0f})"
                        f"   x{median / dd:.2f} dd   CPU {cpu:.2f} s/GiB (x{cpu / dd_cpu:.2f} dd)"
                    )
            print(f"  target: scrub >= 0.9 x dd; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
