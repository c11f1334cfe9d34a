"""Benchmarks of the Cython fast path: dirty-bitmap marks, extent iteration, cut() stalls, and
per-block crc32c. Each figure is measured beside a peer in the same run, the cases interleaved
round by round, so that the noise of a shared machine hits both alike; medians and ratios of
medians are reported, with the best round for reference.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable

import crc32c
import numpy as np

from shadowblk._native import blockcrc as native
from shadowblk.integrity.blockcrc import block_crc32c, hardware_crc32c
from shadowblk.tracking.bitmap import DirtyBitmap, ReferenceBitmap

GIB = 1 << 30
TIB = 1 << 40
BLOCK = 4096
RNG = np.random.default_rng(2026)

# a case runs once and returns (units done, seconds taken)
Case = Callable[[], tuple[float, float]]


def interleaved(cases: dict[str, Case], rounds: int) -> dict[str, list[float]]:
    """Rates (units per second) of every case, one round of each case after the other."""
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            units, seconds = case()
            rates[name].append(units / seconds)
    return rates


def report(title: str, rates: dict[str, list[float]], unit: str, scale: float, peer: str) -> None:
    """Median and best of each case, and the ratio of its median to the peer's."""
    print(f"\n{title}")
    base = statistics.median(rates[peer])
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"  {name:<52} median {median / scale:9.2f} {unit}  best {max(values) / scale:9.2f}"
            f"  x{median / base:6.2f} vs {peer}"
        )


def random_offsets(volume: int, n: int) -> np.ndarray:
    return RNG.integers(0, volume // BLOCK, n, dtype=np.uint64) * BLOCK


# --- marks ------------------------------------------------------------------------------------


def bench_batch_marks() -> None:
    n = 1_000_000
    lengths = np.full(n, BLOCK, dtype=np.uint64)
    offsets = {vol: random_offsets(vol, n) for vol in (16 * GIB, TIB)}
    ref_n = 100_000

    def fast(volume: int) -> Case:
        def run() -> tuple[float, float]:
            bitmap = DirtyBitmap(volume, BLOCK)
            started = time.perf_counter()
            bitmap.mark_many(offsets[volume], lengths)
            return n, time.perf_counter() - started

        return run

    def reference() -> tuple[float, float]:
        bitmap = ReferenceBitmap(TIB, BLOCK)
        started = time.perf_counter()
        bitmap.mark_many(offsets[TIB][:ref_n], lengths[:ref_n])
        return ref_n, time.perf_counter() - started

    cases = {
        "DirtyBitmap.mark_many, 1 TiB volume": fast(TIB),
        "DirtyBitmap.mark_many, 16 GiB volume (bits in cache)": fast(16 * GIB),
        "ReferenceBitmap.mark_many, 1 TiB volume": reference,
    }
    rates = interleaved(cases, rounds=7)
    report(
        "random 4 KiB marks in batches of 1 M (target >= 5 M/s)",
        rates,
        "M/s",
        1e6,
        "ReferenceBitmap.mark_many, 1 TiB volume",
    )


def bench_single_marks() -> None:
    n = 200_000
    offsets = {vol: random_offsets(vol, n).tolist() for vol in (16 * GIB, TIB)}

    def loop(mark: Callable[[int, int], object], volume: int) -> Case:
        def run() -> tuple[float, float]:
            values = offsets[volume]
            started = time.perf_counter()
            for offset in values:
                mark(offset, BLOCK)
            return n, time.perf_counter() - started

        return run

    def fresh(cls: type, volume: int) -> Case:
        def run() -> tuple[float, float]:
            return loop(cls(volume, BLOCK).mark, volume)()

        return run

    cases = {
        "DirtyBitmap.mark, 1 TiB volume": fresh(DirtyBitmap, TIB),
        "DirtyBitmap.mark, 16 GiB volume (bits in cache)": fresh(DirtyBitmap, 16 * GIB),
        "ReferenceBitmap.mark, 1 TiB volume": fresh(ReferenceBitmap, TIB),
        "floor: {}.get(offset, 4096), the bare call cost": loop({}.get, TIB),
    }
    rates = interleaved(cases, rounds=7)
    report(
        "random 4 KiB marks, one Python call each (target >= 1 M/s)",
        rates,
        "M/s",
        1e6,
        "floor: {}.get(offset, 4096), the bare call cost",
    )


# --- extents ----------------------------------------------------------------------------------


def bench_extents() -> None:
    nblocks = TIB // BLOCK
    blocks = np.sort(RNG.integers(0, nblocks, nblocks // 100, dtype=np.uint64))
    blocks = blocks[np.diff(blocks, prepend=np.uint64(nblocks)) != 0]  # np.unique is slow
    fast = DirtyBitmap(TIB, BLOCK)
    fast.mark_many(blocks * BLOCK, np.full(len(blocks), BLOCK, dtype=np.uint64))
    ref = ReferenceBitmap(TIB, BLOCK)
    ref._blocks.update(blocks.tolist())
    floor = list(fast.extents())
    print(
        f"\nextent iteration, 1 TiB volume, {len(blocks) / nblocks:.2%} of 4 KiB blocks dirty "
        f"at random: {len(floor)} extents"
    )

    def walk(iterate: Callable[[], object]) -> Case:
        def run() -> tuple[float, float]:
            started = time.perf_counter()
            count = sum(1 for _ in iterate())
            return count, time.perf_counter() - started

        return run

    cases = {
        "DirtyBitmap.extents()": walk(fast.extents),
        "ReferenceBitmap.extents()": walk(ref.extents),
        "floor: iterating a ready list of the same tuples": walk(lambda: iter(floor)),
    }
    rates = interleaved(cases, rounds=3)
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:<52} {len(floor) / median:6.2f} s  ({median / 1e6:5.2f} M extents/s)")
    ratio = statistics.median(rates["DirtyBitmap.extents()"]) / statistics.median(
        rates["ReferenceBitmap.extents()"]
    )
    print(f"  DirtyBitmap vs ReferenceBitmap: x{ratio:.1f} (medians)")


# --- checksums --------------------------------------------------------------------------------


def over_buffers(checksum: Callable[[bytes], object], buffers: list[bytes], times: int) -> Case:
    """A case that checksums every buffer `times` times; its units are bytes."""

    def run() -> tuple[float, float]:
        started = time.perf_counter()
        for _ in range(times):
            for buf in buffers:
                checksum(buf)
        return times * sum(map(len, buffers)), time.perf_counter() - started

    return run


def bench_checksums() -> None:
    kind = "hardware (SSE4.2)" if hardware_crc32c() else "software table (no SSE4.2)"
    for count, where in ((1, "one 1 MiB buffer, hot in cache"), (16, "16 different 1 MiB buffers")):
        buffers = [os.urandom(1 << 20) for _ in range(count)]
        repeat = 320 // count
        cases = {
            "block_crc32c, 4 KiB blocks": over_buffers(block_crc32c, buffers, repeat),
            "block_crc32c, 4 KiB blocks, software table": over_buffers(
                lambda b: native.block_crc32c(b, BLOCK, False), buffers, max(1, repeat // 10)
            ),
            "crc32c package, one call per 4 KiB block": over_buffers(
                package_per_block, buffers, max(1, repeat // 4)
            ),
            "crc32c package, one call per 1 MiB buffer": over_buffers(
                crc32c.crc32c, buffers, repeat
            ),
        }
        rates = interleaved(cases, rounds=9)
        report(
            f"crc32c in 4 KiB blocks, {where}, {kind} (target >= 10 GB/s)",
            rates,
            "GB/s",
            1e9,
            "crc32c package, one call per 1 MiB buffer",
        )


def package_per_block(buf: bytes) -> list[int]:
    """The crc32c package called block by block: what the shipper would do without the fast path."""
    view = memoryview(buf)
    return [crc32c.crc32c(view[i : i + BLOCK]) for i in range(0, len(view), BLOCK)]


# --- cut() stalls -----------------------------------------------------------------------------


class Marker(threading.Thread):
    """Marks random blocks one call at a time and notes every gap between two consecutive marks
    longer than `threshold_ns`, with when it happened."""

    def __init__(self, bitmap: DirtyBitmap, threshold_ns: int = 50_000) -> None:
        super().__init__(daemon=True)
        self.bitmap = bitmap
        self.threshold = threshold_ns
        self.offsets = random_offsets(bitmap.size, 4096).tolist()
        self.gaps: list[tuple[int, int]] = []
        self.marks = 0
        self.running = True

    def run(self) -> None:
        mark, now, offsets, gaps = self.bitmap.mark, time.perf_counter_ns, self.offsets, self.gaps
        prev = now()
        while self.running:
            for offset in offsets:
                mark(offset, BLOCK)
                t = now()
                if t - prev > self.threshold:
                    gaps.append((prev, t))
                prev = t
            self.marks += len(offsets)

    def worst(self, start: int, end: int) -> int:
        """The longest gap that overlaps [start, end], in ns (0 if none above the threshold)."""
        return max((b - a for a, b in self.gaps if a <= end and b >= start), default=0)


def realtime(on: bool) -> bool:
    """Run this thread, and the threads it starts, under SCHED_FIFO (or back to normal). The
    figures then show what the code does rather than what the neighbours on a shared machine
    do; threads are busy for well under a second at a time. False if not permitted."""
    try:
        if on:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (PermissionError, AttributeError):
        return False
    return True


def bench_cut_stall(rounds: int = 3, probes: int = 10) -> None:
    volume = 16 * TIB
    nblocks = volume // BLOCK
    chunk = 4_000_000
    lengths = np.full(chunk, BLOCK, dtype=np.uint64)
    bitmap = DirtyBitmap(volume, BLOCK)
    started = time.perf_counter()
    for _ in range(nblocks // 100 // chunk + 1):
        bitmap.mark_many(RNG.integers(0, nblocks, chunk, dtype=np.uint64) * BLOCK, lengths)
    print(
        f"\ncut() of a 16 TiB volume with {bitmap.count() / nblocks:.2%} of 4 KiB blocks dirty"
        f" ({bitmap.count()} blocks, {bitmap._memory() >> 20} MiB, filled at random in"
        f" {time.perf_counter() - started:.0f} s) while another thread marks one block per call"
        " (target: no gap > 1 ms)"
    )
    print(
        "  gap = time between two consecutive marks of that thread, across the call;"
        f" peer: {probes} bitmap.count() calls made the same way (GIL hand-over and scheduler);"
        " quiet: the longest gap in 0.3 s with the main thread asleep"
    )
    for r in range(2 * rounds):
        scheduling = "SCHED_FIFO " if r >= rounds and realtime(True) else "normal     "
        marker = Marker(bitmap)
        marker.start()
        time.sleep(0.2)
        quiet_start = time.perf_counter_ns()
        time.sleep(0.3)
        quiet = marker.worst(quiet_start, time.perf_counter_ns())
        probe_gaps = []
        for _ in range(probes):
            t0 = time.perf_counter_ns()
            bitmap.count()
            t1 = time.perf_counter_ns()
            time.sleep(0.02)
            probe_gaps.append(marker.worst(t0, t1))
        t0 = time.perf_counter_ns()
        taken = bitmap.cut()
        t1 = time.perf_counter_ns()
        time.sleep(0.05)
        cut_gap = marker.worst(t0, t1)
        marker.running = False
        marker.join()
        bitmap.union(taken)  # refill for the next round, with no marker running
        marker = Marker(bitmap)
        marker.start()
        time.sleep(0.05)
        f0 = time.perf_counter_ns()
        del taken  # frees its ~512 MiB of pages with the GIL released
        f1 = time.perf_counter_ns()
        time.sleep(0.05)
        marker.running = False
        marker.join()
        realtime(False)
        peer = statistics.median(probe_gaps)
        print(
            f"  {scheduling} round {r % rounds + 1}: cut() {(t1 - t0) / 1e3:6.1f} us, gap across it"
            f" {cut_gap / 1e3:7.1f} us | peer gaps median {peer / 1e3:7.1f}"
            f" max {max(probe_gaps) / 1e3:7.1f} us | quiet {quiet / 1e3:7.1f} us"
            f" | freeing the cut set {(f1 - f0) / 1e6:5.0f} ms, gap across it"
            f" {marker.worst(f0, f1) / 1e3:7.1f} us"
        )


def main() -> None:
    print(f"fast path benchmarks, pid {os.getpid()}, load average {os.getloadavg()[0]:.1f}")
    bench_batch_marks()
    bench_single_marks()
    bench_extents()
    bench_checksums()
    bench_cut_stall()


if __name__ == "__main__":
    main()
