"""Replication benchmark: MiB/s of the delta stream beside the physical limits of this machine,
measured in the same run, interleaved, so that the ratios hold whatever the load.

    python -m tools.bench.replication [--size 128] [--rounds 2] [--level 1] [--dir DIR]

Two data sets: random bytes (incompressible) and an ext4 image made by `mke2fs -d` from a folder
filled with files copied from /usr (Python sources, documentation, message catalogues: a mix of
text and already-compressed files), sparse where the file system is empty. Per round and data
set: zstd level 1 on the data (one core, 1 MiB pieces, as the shipper compresses), loopback TCP
(one connection, 1 MiB sends), disk (write + fdatasync: the shadow writes every byte it applies),
then replication against a real `shadowblk shadow` process: the full sync of a new shadow and
streaming (1 MiB sequential writes captured by the Replicator, cut every 8 MiB, until the shadow
applied everything). Replication figures count data bytes (the ext4 image's holes are not data);
the CPU time of both processes per GiB replicated is the figure the load moves least (and, while
streaming, each process's CPU ms per MiB; the primary's includes the benchmark's own writes).
Prints a markdown table of medians and of each replication figure as a share of the limits.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zstandard

import shadowblk
from shadowblk.delta.replicator import Replicator
from shadowblk.delta.sources import segments
from tools.bench.workdir import scratch

ROOT = Path(shadowblk.__file__).resolve().parents[1]  # the shadow runs the same code
MiB = 1 << 20
WRITE = 1 << 20
CUT_EVERY = 8 << 20
FILL = 0.75  # share of the ext4 image filled with files
SOURCES = ("/usr/lib/python3.11", "/usr/share/doc", "/usr/share/locale", "/usr/share")


def random_image(path: Path, size: int) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(size))


def ext4_image(path: Path, size: int, work: Path) -> None:
    """An ext4 file system of SIZE bytes holding about FILL of it in files copied from /usr."""
    tree = work / "tree"
    budget = int(size * FILL)
    for source in SOURCES:
        for folder, _, files in os.walk(source):
            for name in sorted(files):
                src = Path(folder, name)
                if budget <= 0:
                    break
                if src.is_symlink() or not src.is_file():
                    continue
                dest = tree / src.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(src, dest)
                except OSError:
                    continue
                budget -= dest.stat().st_size
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(path), f"{size // 1024}k"],
        check=True,
    )
    shutil.rmtree(tree)


def data_of(path: Path, size: int) -> list[tuple[int, bytes]]:
    """(offset, bytes) of every data segment of the image (its holes left out)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [
            (offset, os.pread(fd, length, offset))
            for offset, length, hole in segments(fd, size, 4096)
            if not hole
        ]
    finally:
        os.close(fd)


def zstd_rate(pieces: list[tuple[int, bytes]], level: int) -> tuple[float, float]:
    """(MiB/s, ratio) compressing the data in 1 MiB pieces with one compressor, one core."""
    cctx = zstandard.ZstdCompressor(level=level)
    total = out = 0
    start = time.perf_counter()
    for _, data in pieces:
        view = memoryview(data)
        for i in range(0, len(view), MiB):
            out += len(cctx.compress(view[i : i + MiB]))
        total += len(view)
    return total / MiB / (time.perf_counter() - start), total / out


def tcp_rate(total: int) -> float:
    """MiB/s of one loopback TCP connection, 1 MiB sends."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def sink() -> None:
            conn, _ = listener.accept()
            with conn:
                buf = bytearray(MiB)
                while conn.recv_into(buf):
                    pass

        reader = threading.Thread(target=sink)
        reader.start()
        chunk = os.urandom(MiB)
        start = time.perf_counter()
        with socket.create_connection(listener.getsockname()) as s:
            for _ in range(total // MiB):
                s.sendall(chunk)
        reader.join()
        return total / MiB / (time.perf_counter() - start)


def disk_rate(path: Path, total: int) -> float:
    """MiB/s of writing TOTAL bytes to a new file in 1 MiB pieces, then fdatasync."""
    chunk = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(total // MiB):
            os.write(fd, chunk)
        os.fdatasync(fd)
        return total / MiB / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()


def start_shadow(data_dir: Path, key: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shadowblk.cli",
            "shadow",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--hmac-key-file",
            str(key),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("ready "):
        proc.kill()
        raise RuntimeError(f"shadow did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def replication(
    work: Path, image: Path, size: int, level: int, pieces: list[tuple[int, bytes]]
) -> tuple[float, float, float, float, float]:
    """(full sync MiB/s of IMAGE to a new shadow, streaming MiB/s of PIECES written over it, CPU
    seconds of both processes per GiB replicated, and the streaming's CPU ms per MiB in the
    primary and in the shadow) of data bytes, against a real `shadowblk shadow` process."""
    cpu = -cpu_seconds(resource.RUSAGE_SELF) - cpu_seconds(resource.RUSAGE_CHILDREN)
    key = work / "key"
    key.write_text(os.urandom(32).hex())
    data_bytes = sum(len(data) for _, data in pieces)
    fd = os.open(image, os.O_RDWR)
    proc, port = start_shadow(work / "shadow", key)
    try:
        rep = Replicator(
            "bench",
            fd,
            size,
            [f"127.0.0.1:{port}"],
            work / "state",
            level=level,
            hmac_key=key.read_text().encode(),
            cut_interval=None,
            max_lag_bytes=256 * MiB,
        )
        start = time.perf_counter()
        rep.start()
        if not rep.drain(600):
            raise RuntimeError(f"full sync did not finish: {rep.status()}")
        full = data_bytes / MiB / (time.perf_counter() - start)
        start = time.perf_counter()
        mine, theirs = cpu_seconds(resource.RUSAGE_SELF), proc_cpu_seconds(proc.pid)
        since_cut = 0
        for base, data in pieces:
            view = memoryview(data)
            for i in range(0, len(view), WRITE):
                piece = view[i : i + WRITE]
                rep.on_write(base + i, piece)
                os.pwrite(fd, piece, base + i)
                since_cut += len(piece)
                if since_cut >= CUT_EVERY:
                    rep.cut_epoch()
                    since_cut = 0
        if not rep.drain(600):
            raise RuntimeError(f"stream did not drain: {rep.status()}")
        streaming = data_bytes / MiB / (time.perf_counter() - start)
        mine = cpu_seconds(resource.RUSAGE_SELF) - mine
        theirs = proc_cpu_seconds(proc.pid) - theirs
        rep.close()
    finally:
        proc.terminate()
        proc.wait(30)
        os.close(fd)
        shutil.rmtree(work / "shadow", ignore_errors=True)
        shutil.rmtree(work / "state", ignore_errors=True)
    cpu += cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)
    per_mib = 1000 * MiB / data_bytes
    return full, streaming, cpu / (2 * data_bytes / (1 << 30)), mine * per_mib, theirs * per_mib


def measure(work: Path, name: str, size: int, level: int, rounds: int) -> dict[str, list[float]]:
    """Every figure of every round for one data set, the limits next to the replication."""
    image = work / f"{name}.img"
    if name == "random":
        random_image(image, size)
    else:
        ext4_image(image, size, work)
    pieces = data_of(image, size)
    data_bytes = sum(len(data) for _, data in pieces)
    figures: dict[str, list[float]] = {"data MiB": [data_bytes / MiB]}
    for _ in range(rounds):
        zstd, ratio = zstd_rate(pieces, level)
        tcp = tcp_rate(max(data_bytes, 256 * MiB) // MiB * MiB)
        disk = disk_rate(work / "disk.test", max(data_bytes, 64 * MiB) // MiB * MiB)
        full, streaming, cpu, primary, shadow = replication(work, image, size, level, pieces)
        for key, value in [
            ("zstd", zstd),
            ("ratio", ratio),
            ("tcp", tcp),
            ("disk", disk),
            ("full", full),
            ("streaming", streaming),
            ("cpu", cpu),
            ("primary ms", primary),
            ("shadow ms", shadow),
            ("full/zstd", full / zstd),
            ("full/tcp", full / tcp),
            ("streaming/zstd", streaming / zstd),
            ("streaming/tcp", streaming / tcp),
            ("streaming/disk", streaming / disk),
        ]:
            figures.setdefault(key, []).append(value)
    image.unlink()
    return figures


def report(size: int, level: int, rounds: int, results: dict[str, dict[str, list[float]]]) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(results[name][key])

    names = list(results)
    print(f"{size} MiB volumes, zstd level {level}, HMAC, medians of {rounds} interleaved rounds")
    print()
    print("| measure | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    rows = [
        ("data shipped (MiB)", lambda n: f"{med(n, 'data MiB'):.0f}"),
        ("zstd level 1, one core (MiB/s)", lambda n: f"{med(n, 'zstd'):.0f}"),
        ("zstd ratio", lambda n: f"{med(n, 'ratio'):.2f}"),
        ("loopback TCP, one connection (MiB/s)", lambda n: f"{med(n, 'tcp'):.0f}"),
        ("disk write + fdatasync (MiB/s)", lambda n: f"{med(n, 'disk'):.0f}"),
        ("full sync of a new shadow (MiB/s)", lambda n: f"{med(n, 'full'):.0f}"),
        ("streaming 1 MiB writes until applied (MiB/s)", lambda n: f"{med(n, 'streaming'):.0f}"),
        ("CPU s per GiB replicated, both sides", lambda n: f"{med(n, 'cpu'):.1f}"),
        (
            "streaming CPU ms per MiB: primary, shadow",
            lambda n: f"{med(n, 'primary ms'):.1f}, {med(n, 'shadow ms'):.1f}",
        ),
        ("full sync / zstd, / TCP", lambda n: _shares(results[n], "full", ("zstd", "tcp"))),
        (
            "streaming / zstd, / TCP, / disk",
            lambda n: _shares(results[n], "streaming", ("zstd", "tcp", "disk")),
        ),
    ]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(n) for n in names) + " |")


def _shares(figures: dict[str, list[float]], what: str, limits: tuple[str, ...]) -> str:
    return ", ".join(f"{statistics.median(figures[f'{what}/{limit}']):.0%}" for limit in limits)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; ARGV None (as from tools.bench.run) means the defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="MiB per volume (default 128)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per data set (default 2)")
    parser.add_argument("--level", type=int, default=1, help="zstd level (default 1)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp)")
    args = parser.parse_args(argv or [])
    size = args.size * MiB
    with scratch("bench-repl-", args.dir) as work:
        results = {
            name: measure(work, name, size, args.level, args.rounds) for name in ("random", "ext4")
        }
    report(args.size, args.level, args.rounds, results)


if __name__ == "__main__":
    main(sys.argv[1:])
