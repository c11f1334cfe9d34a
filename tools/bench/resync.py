"""Resync of a shadow that was away: bytes shipped against the bytes written while it was away.

    python -m tools.bench.resync [--size 1024] [--away 30] [--seed 7] [--rate-iops 1500]
        [--dir DIR] [--json]

A `shadowblk serve` primary (async mode, `--max-lag-bytes 8M`, so that an absent shadow soon
costs more memory than the budget and falls back to its lacks bitmap) replicates to one
`shadowblk shadow` through a small TCP relay that parses the frame headers of the stream
(docs/protocol.md: every data frame's header carries its length before compression, and an
EXTENT frame's payload opens with its list of extents). fio (nbd engine, 4k randwrite,
iodepth 16, no random map so that blocks are written several times and others not at all,
random data refilled for every write, fixed seed, at most RATE_IOPS writes per second so that
the dirty set does not depend on the machine) writes for 5 s with the shadow there; once the
shadow has applied everything it is stopped
(SIGTERM), fio writes for AWAY seconds more (its `--write_iolog` records every write), then the
shadow is restarted on the same port and the benchmark waits until it has applied everything
again. Figures of the resync (everything the relay forwarded to the restarted shadow): the data
frames' bytes before compression, how many blocks it sent twice, the bytes on the wire
(compressed, with headers and tags), against the distinct 4 KiB blocks fio wrote while the
shadow was away and the replicator's own `lacks_bytes`. The issue's target: resync sends
<= 1.0x the dirty bytes before compression (no block twice).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from shadowblk.delta.extents import COUNT, ENTRY
from shadowblk.delta.frames import FLAG_HMAC, HEADER_SIZE, TAG_SIZE, FrameType, decode_header
from shadowblk.nbd.replication import StatusUnavailable, read_status
from tests.procs import SHADOWBLK, Processes, free_port
from tools.bench.workdir import scratch

MiB = 1 << 20
BLOCK = 4096
DATA = {FrameType.EXTENT, FrameType.ZERO, FrameType.TRIM}


class Relay:
    """TCP relay to the shadow; records the header of every frame the primary sends."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        # conn, type, (offset, length) ranges, data length, wire bytes
        self.frames: list[tuple[int, FrameType, list[tuple[int, int]], int, int]] = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()  # the shadow is away: the primary retries
                continue
            upstream.settimeout(None)
            with self.lock:
                self.connections += 1
                conn = self.connections
            threading.Thread(target=self._back, args=(upstream, client), daemon=True).start()
            threading.Thread(target=self._forth, args=(client, upstream, conn), daemon=True).start()

    @staticmethod
    def _back(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def _forth(self, src: socket.socket, dst: socket.socket, conn: int) -> None:
        def exactly(n: int) -> bytes:
            buf = bytearray()
            while len(buf) < n:
                chunk = src.recv(n - len(buf))
                if not chunk:
                    raise EOFError
                buf += chunk
            return bytes(buf)

        try:
            while True:
                head = exactly(HEADER_SIZE)
                frame, plen, _ = decode_header(head)
                rest = exactly(plen + (TAG_SIZE if frame.flags & FLAG_HMAC else 0))
                dst.sendall(head + rest)
                ranges = [(frame.offset, frame.length)]
                if frame.type is FrameType.EXTENT:  # its extents open the payload
                    (count,) = COUNT.unpack_from(rest)
                    table = np.frombuffer(rest, dtype=ENTRY, count=count, offset=COUNT.size)
                    ranges = list(
                        zip(table["offset"].tolist(), table["length"].tolist(), strict=True)
                    )
                with self.lock:
                    self.frames.append(
                        (conn, frame.type, ranges, frame.length, len(head) + len(rest))
                    )
        except (OSError, EOFError, ValueError):
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        self.listener.close()


def start_shadow(procs: Processes, data_dir: Path, key: Path, port: int) -> subprocess.Popen:
    proc = procs.start(
        [*SHADOWBLK, "shadow", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
         "--hmac-key-file", str(key)],
        "shadow",
    )  # fmt: skip
    procs.wait_ready(proc)
    return proc


def converged(state_dir: Path, timeout: float = 300) -> dict:
    """The first status published after this call in which the shadow applied everything."""
    since = time.time()
    deadline = time.monotonic() + timeout
    doc: dict = {}
    while time.monotonic() < deadline:
        try:
            doc = read_status(state_dir)
        except StatusUnavailable:
            doc = {}
        if (
            doc
            and doc["updated"] > since
            and doc["lag_bytes"] == 0
            and all(
                s["connected"] and s["in_sync"] and s["acked_epoch"] == doc["last_cut_epoch"]
                for s in doc["shadows"]
            )
        ):
            return doc
        time.sleep(0.1)
    raise RuntimeError(f"the shadow did not converge within {timeout}s: {doc}")


def fio(
    cwd: Path, url: str, size: int, seconds: float, seed: int, name: str, rate_iops: int
) -> dict:
    argv = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={url}", "--rw=randwrite",
            "--bs=4k", "--iodepth=16", f"--size={size}", "--time_based", f"--runtime={seconds}",
            "--norandommap", "--refill_buffers", "--randrepeat=1", f"--randseed={seed}",
            f"--write_iolog={cwd / name}.iolog", "--output-format=json",
            f"--output={cwd / name}.json"]  # fmt: skip
    if rate_iops:
        argv.append(f"--rate_iops={rate_iops}")
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, timeout=seconds + 120)
    job = json.loads((cwd / f"{name}.json").read_text())["jobs"][0]
    if job["error"]:
        sys.exit(f"fio {name}: error {job['error']}")
    return job


def written_blocks(iolog: Path) -> set[int]:
    """The 4 KiB blocks of every write in a fio iolog (`[TIME] FILE write OFFSET LENGTH`)."""
    blocks: set[int] = set()
    for line in iolog.read_text().splitlines():
        parts = line.split()
        if len(parts) in (4, 5) and parts[-3] == "write":
            offset, length = int(parts[-2]), int(parts[-1])
            blocks.update(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))
    return blocks


def measure(work: Path, size_mib: int, away: float, seed: int, rate_iops: int) -> dict:
    procs = Processes(work)
    key = work / "key"
    key.write_text(os.urandom(32).hex())
    state = work / "state"
    shadow_port = free_port()
    relay = Relay(shadow_port)
    try:
        shadow = start_shadow(procs, work / "shadow", key, shadow_port)
        primary = procs.start(
            [*SHADOWBLK, "serve", str(work / "vol.img"), "--size", f"{size_mib}M", "--name",
             "vol", "--listen", "127.0.0.1:0", "--state-dir", str(state), "--mode", "async",
             "--max-lag-bytes", "8M", "--shadow", f"127.0.0.1:{relay.port}",
             "--hmac-key-file", str(key)],
            "serve",
        )  # fmt: skip
        url = procs.wait_ready(primary).split()[1]
        converged(state)
        fio(work, url, size_mib * MiB, 5, seed, "before", rate_iops)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", url], check=True)
        converged(state)
        if procs.stop(shadow, signal.SIGTERM) != 0:
            sys.exit("the shadow did not stop cleanly")
        away_job = fio(work, url, size_mib * MiB, away, seed + 1, "away", rate_iops)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", url], check=True)
        time.sleep(1)  # the primary's status catches up with the last writes
        lacks_before = read_status(state)["shadows"][0]["lacks_bytes"]
        with relay.lock:
            first_frame = len(relay.frames)
            first_conn = relay.connections + 1
        started = time.monotonic()
        shadow = start_shadow(procs, work / "shadow", key, shadow_port)
        doc = converged(state)
        seconds = time.monotonic() - started
        if procs.stop(primary, signal.SIGTERM) != 0:
            sys.exit("the primary did not stop cleanly")
        procs.stop(shadow, signal.SIGTERM)
        identical = subprocess.run(
            ["cmp", str(work / "vol.img"), str(work / "shadow" / "vol.img")], capture_output=True
        )
    finally:
        procs.stop_all()
        relay.close()
    with relay.lock:
        frames = [f for f in relay.frames[first_frame:] if f[0] >= first_conn]
    dirty = written_blocks(work / "away.iolog")
    if not dirty:
        sys.exit("no write found in fio's iolog")
    sent_blocks: list[int] = []
    raw = wire = 0
    for _, kind, ranges, length, nbytes in frames:
        wire += nbytes
        if kind in DATA:
            raw += length
            for offset, n in ranges:
                sent_blocks.extend(range(offset // BLOCK, (offset + n - 1) // BLOCK + 1))
    twice = len(sent_blocks) - len(set(sent_blocks))
    link = doc["shadows"][0]
    return {
        "size_mib": size_mib,
        "rate_iops": rate_iops,
        "away_s": away,
        "fio_writes_away": away_job["write"]["total_ios"],
        "fio_write_mib_away": away_job["write"]["io_bytes"] / MiB,
        "dirty_bytes": len(dirty) * BLOCK,
        "lacks_bytes": lacks_before,
        "catch_up": link["catch_up"],
        "sync_total": link["sync_progress"][1],
        "resync_raw_bytes": raw,
        "resync_wire_bytes": wire,
        "blocks_sent_twice": twice,
        "blocks_not_dirty": len(set(sent_blocks) - dirty),
        "dirty_not_sent": len(dirty - set(sent_blocks)),
        "resync_seconds": seconds,
        "identical": identical.returncode == 0,
    }


def report(r: dict) -> None:
    d = r["dirty_bytes"]
    print(
        f"{r['size_mib']} MiB volume, shadow away {r['away_s']:.0f} s under fio 4k randwrite "
        f"qd16 capped at {r['rate_iops'] or 'no'} IOPS ({r['fio_writes_away']} writes, "
        f"{r['fio_write_mib_away']:.0f} MiB)"
    )
    print()
    print("| measure | value |")
    print("|---|---:|")
    rows = [
        ("catch-up plan on reconnect", r["catch_up"]),
        ("dirty while away: distinct 4 KiB blocks fio wrote (MiB)", f"{d / MiB:.1f}"),
        ("  share of the volume", f"{d / (r['size_mib'] * MiB):.0%}"),
        ("  4 KiB writes while away / distinct blocks",
         f"{r['fio_writes_away'] * BLOCK / d:.2f}"),
        ("replicator's lacks_bytes before the restart (MiB)", f"{r['lacks_bytes'] / MiB:.1f}"),
        ("resync data frames, before compression (MiB)", f"{r['resync_raw_bytes'] / MiB:.1f}"),
        ("  / dirty bytes", f"{r['resync_raw_bytes'] / d:.3f}x"),
        ("blocks sent twice", str(r["blocks_sent_twice"])),
        ("blocks sent that were not dirty", str(r["blocks_not_dirty"])),
        ("dirty blocks not sent", str(r["dirty_not_sent"])),
        ("resync bytes on the wire, compressed + framing (MiB)",
         f"{r['resync_wire_bytes'] / MiB:.1f}"),
        ("  / dirty bytes", f"{r['resync_wire_bytes'] / d:.3f}x"),
        ("resync time to applied (s)", f"{r['resync_seconds']:.1f}"),
        ("shadow identical to the primary after the resync (cmp)", str(r["identical"])),
    ]  # fmt: skip
    for label, value in rows:
        print(f"| {label} | {value} |")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; ARGV None (as from tools.bench.run) means the defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB of the volume (1024)")
    parser.add_argument("--away", type=float, default=30, help="s the shadow is away (30)")
    parser.add_argument("--seed", type=int, default=7, help="fio's random seed (default 7)")
    parser.add_argument(
        "--rate-iops", type=int, default=1500, help="fio's write rate cap, 0: none (1500)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv or [])
    with scratch("bench-resync-", args.dir) as work:
        result = measure(work, args.size, args.away, args.seed, args.rate_iops)
    report(result)
    if args.json:
        print(json.dumps(result))
    if result["blocks_sent_twice"] or result["dirty_not_sent"] or not result["identical"]:
        sys.exit("resync target missed: see the table")


if __name__ == "__main__":
    main(sys.argv[1:])
