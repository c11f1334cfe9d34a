"""Replication benchmark: MiB/s of the delta stream beside its two ceilings on this machine,
zstd level-1 compression of the same data and loopback TCP bandwidth, measured in one run.

    python -m tools.bench.replication [--size 256] [--level 1] [--dir DIR]

Two replication figures: the full sync of a new shadow (the volume read from the file) and
streaming (writes captured by the Replicator, cut every 8 MiB, until the shadow applied all).
Data: 64 KiB writes whose halves repeat (about 2:1 for zstd). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zstandard

from shadowblk.delta.replicator import Replicator

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
WRITE = 64 << 10


def payload(rng: random.Random, n: int) -> bytes:
    return b"".join(rng.randbytes(WRITE // 2) * 2 for _ in range(n // WRITE))


def zstd_rate(data: bytes, level: int) -> tuple[float, float]:
    """(MiB/s, ratio) compressing DATA in 1 MiB pieces, as the shipper does."""
    cctx = zstandard.ZstdCompressor(level=level)
    start = time.perf_counter()
    out = sum(len(cctx.compress(data[i : i + MiB])) for i in range(0, len(data), MiB))
    return len(data) / MiB / (time.perf_counter() - start), len(data) / out


def tcp_rate(total: int) -> float:
    """MiB/s of one loopback TCP connection, 1 MiB sends."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def sink() -> None:
            conn, _ = listener.accept()
            with conn:
                while conn.recv(1 << 20):
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


def replication(
    work: Path, size: int, level: int, first: bytes, second: bytes
) -> tuple[float, float]:
    """(full sync MiB/s of FIRST to a new shadow, streaming MiB/s of SECOND written over it)
    against a real `shadowblk shadow` process."""
    key = work / "key"
    key.write_text(os.urandom(32).hex())
    image = work / "primary.img"
    image.write_bytes(first)
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
        full = size / MiB / (time.perf_counter() - start)
        start = time.perf_counter()
        for offset in range(0, size, WRITE):
            piece = second[offset : offset + WRITE]
            rep.on_write(offset, piece)
            os.pwrite(fd, piece, offset)
            if (offset + WRITE) % (8 * MiB) == 0:
                rep.cut_epoch()
        if not rep.drain(600):
            raise RuntimeError(f"stream did not drain: {rep.status()}")
        streaming = size / MiB / (time.perf_counter() - start)
        rep.close()
    finally:
        proc.terminate()
        proc.wait(30)
        os.close(fd)
    return full, streaming


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="MiB of data (default 256)")
    parser.add_argument("--level", type=int, default=1, help="zstd level (default 1)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp)")
    args = parser.parse_args()
    size = args.size * MiB
    rng = random.Random(1)
    data = payload(rng, size)
    second = payload(rng, size)  # streaming rewrites the volume with new data
    work = Path(tempfile.mkdtemp(prefix="bench-repl-", dir=args.dir))
    try:
        zstd, ratio = zstd_rate(data, args.level)
        tcp = tcp_rate(max(size, 512 * MiB))
        full, streaming = replication(work, size, args.level, data, second)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"| measure ({args.size} MiB, zstd level {args.level}) | MiB/s |")
    print("|---|---:|")
    print(f"| zstd compress, one core (ratio {ratio:.2f}) | {zstd:.0f} |")
    print(f"| loopback TCP, one connection | {tcp:.0f} |")
    print(f"| replication: full sync of a new shadow | {full:.0f} |")
    print(f"| replication: streaming writes until applied | {streaming:.0f} |")


if __name__ == "__main__":
    main()
