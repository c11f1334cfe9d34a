"""`shadowblk attach --manager`: the router follows the primary endpoint a real manager reports.

The agent's part is played by heartbeats sent from the test (the endpoint of the volume it
hosts as primary); the NBD servers are real (`shadowblk serve` and `nbdkit file` on one file).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.integration.test_attach_switchover import control, start_nbdkit, start_serve
from tests.manager_lab import SERVERS, start_manager
from tests.procs import SHADOWBLK, Processes, free_port


def hosted(endpoint: str) -> dict:
    return {"vol": {"role": "primary", "state": "running", "endpoint": endpoint}}


def test_attach_follows_the_managers_primary_endpoint(procs: Processes, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    _, serve_uri = start_serve(procs, image)
    _, kit_uri = start_nbdkit(procs, image)
    lab = start_manager(procs, f"sqlite:{tmp_path / 'meta.db'}", tmp_path)
    client = lab.client()
    client.register(**SERVERS[0])
    client.heartbeat("s1", used_bytes=0, io_load=0.1, hosted=hosted(serve_uri))
    client.create_volume(name="vol", size_bytes=64 << 20, shadows=0, primary="s1")

    ctl = f"127.0.0.1:{free_port()}"
    argv = [*SHADOWBLK, "-v", "attach", "vol", "--listen", "127.0.0.1:0", "--manager", lab.url,
            "--control", ctl, "--poll", "0.2"]  # fmt: skip
    attach = procs.start(argv, "attach")
    uri = procs.wait_ready(attach).split()[1]
    status = control(f"http://{ctl}", "GET", "/status")[1]
    assert status["upstream"] == serve_uri and status["generation"] == 1, status

    io = ["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", uri]
    assert subprocess.run(io, capture_output=True, timeout=60).returncode == 0

    client.heartbeat("s1", used_bytes=0, io_load=0.1, hosted=hosted(kit_uri))
    deadline = time.monotonic() + 10
    while control(f"http://{ctl}", "GET", "/status")[1]["upstream"] != kit_uri:
        assert time.monotonic() < deadline, "the router did not follow the manager"
        time.sleep(0.1)
    check = ["qemu-io", "-f", "raw", "-c", "read -P 0x42 0 1M", uri]
    read = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert read.returncode == 0 and "verification failed" not in read.stdout, read
    assert control(f"http://{ctl}", "GET", "/status")[1]["errors"] == 0
