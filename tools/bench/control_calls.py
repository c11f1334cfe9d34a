"""Round trips to the agent's control endpoint, as the manager's client makes them in a
switchover's pause.

    python -m tools.bench.control_calls [--calls 300] [--rounds 3]

A real control endpoint (`shadowblk/agent/control.py`, in its own process, over a small
primary's checksum map) answers `dirty` calls from an aiohttp client, one at a time; per round,
the milliseconds per call (median and p90). The tree the command runs from decides which
endpoint answers (run it from two copies of the tree, alternately, to compare them).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp

TOKEN = "bench"


def serve(data_dir: Path) -> None:
    """The endpoint, until killed: its port on stdout."""
    from shadowblk.agent.control import serve_control
    from shadowblk.agent.hosting import Endpoint
    from shadowblk.integrity.checksum_map import ChecksumMap

    state = data_dir / "primaries" / "v1.state"
    state.mkdir(parents=True)
    image = data_dir / "v1.img"
    image.write_bytes(b"\1" * 4096 + bytes(255 * 4096))
    ChecksumMap.build(image, state / "checksums.map", 4096).close()
    server = serve_control(Endpoint("127.0.0.1", 0), SimpleNamespace(data_dir=data_dir), TOKEN)
    print(server.server_address[1], flush=True)
    while True:
        time.sleep(3600)


async def calls(port: int, n: int) -> list[float]:
    url = f"http://127.0.0.1:{port}/v1/volumes/v1/dirty"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    took = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            started = time.monotonic()
            async with session.post(url, json={"generation": 1}, headers=headers) as reply:
                await reply.json(content_type=None)
                if reply.status != 200:
                    raise SystemExit(f"the endpoint answered {reply.status}")
            took.append((time.monotonic() - started) * 1000)
    return took


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the endpoint's process
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return
    with tempfile.TemporaryDirectory(prefix="control-calls-") as work:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.bench.control_calls", "--serve", work],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            print("| round | ms per call, median | p90 | load |\n|---|---|---|---|")
            for i in range(args.rounds):
                took = sorted(asyncio.run(calls(port, args.calls)))
                p90 = took[int(len(took) * 0.9)]
                load = Path("/proc/loadavg").read_text().split()[0]
                print(f"| {i + 1} | {statistics.median(took):.2f} | {p90:.2f} | {load} |")
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
