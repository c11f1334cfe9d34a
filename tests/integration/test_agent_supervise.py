"""One real agent against a real manager: its health report, a primary served where it says,
a dead `serve` child restarted on the same port with the data intact, a restarted agent
serving its volumes again from its state file, and no child outliving a SIGKILLed agent."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.agent_lab import (
    agent_groups_fixture,  # noqa: F401 - the fixture agent_groups
    child_running,
    children_of,
    running,
    serving,
    start_agent,
    wait_for,
)
from tests.manager_lab import start_manager
from tests.procs import Processes, free_port

MiB = 1 << 20


def qemu_io(url: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c", command, url], capture_output=True, text=True, timeout=30
    )


def test_agent_hosts_restarts_and_cleans_up(
    procs: Processes,
    agent_groups: list[int],
    tmp_path: Path,
) -> None:
    lab = start_manager(procs, f"sqlite:{tmp_path / 'meta.db'}", tmp_path)
    client = lab.client()
    data_dir = tmp_path / "s1"
    metrics = f"127.0.0.1:{free_port()}"
    agent = start_agent(
        procs, agent_groups, lab.url, lab.token_file, "s1", "a", data_dir,
        "--metrics-listen", metrics,
    )  # fmt: skip

    # health: what the agent measured, as the manager keeps it
    server = wait_for(lambda: (s := client.server("s1"))["health"].get("latency_ms") and s, 10,
                      "a heartbeat with latency percentiles")  # fmt: skip
    assert server["capacity_bytes"] == 4 << 30 and server["state"] == "up"
    latency = server["health"]["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p999"]
    assert server["health"]["io_errors"] == 0
    assert sum(server["health"]["latency_histogram"]["counts"]) > 0
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    (count,) = [s for s in families["shadowblk_io_latency_seconds"].samples
                if s.name.endswith("_count")]  # fmt: skip
    assert count.value > 0
    smart = server["health"]["smart"]
    assert smart["status"] in ("ok", "no SMART device")
    assert smart.get("devices") if smart["status"] == "ok" else smart["reason"]
    assert server["address"].startswith("127.0.0.1:") and not server["address"].endswith(":0")

    # a primary, served where the agent says
    client.create_volume(name="v1", size_bytes=MiB, shadows=0)
    url = wait_for(lambda: serving(client, "s1", "v1"), 15, "v1 served")["endpoint"]
    out = subprocess.run(["nbdinfo", "--size", url], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == str(MiB), out.stderr
    assert qemu_io(url, "write -P 0x5a 4096 8192").returncode == 0
    image = data_dir / "primaries" / "v1.img"
    assert image.read_bytes()[4096 : 4096 + 8192] == b"\x5a" * 8192

    # its serve child dies: restarted, same endpoint, same data
    os.kill(child_running(agent.pid, "serve"), signal.SIGKILL)
    report = wait_for(
        lambda: (r := serving(client, "s1", "v1")) and r.get("restarts") == 1 and r, 20,
        "v1 served again after its serve process was killed",
    )  # fmt: skip
    assert report["endpoint"] == url
    assert qemu_io(url, "read -P 0x5a 4096 8192").returncode == 0

    # SIGTERM: the agent stops its children and exits 0; restarted, it serves v1 again
    kids = children_of(agent.pid)
    assert len(kids) == 2  # the shadow server and v1's serve
    assert procs.stop(agent, signal.SIGTERM) == 0
    assert not any(running(p) for p in kids)
    agent = start_agent(procs, agent_groups, lab.url, lab.token_file, "s1", "a", data_dir)
    kids = wait_for(lambda: len(k := children_of(agent.pid)) == 2 and k, 15, "two children")
    report = wait_for(  # the new agent's report: no restarts counted yet
        lambda: (r := serving(client, "s1", "v1")) and "restarts" not in r and r, 15,
        "v1 served after the agent restarted",
    )  # fmt: skip
    assert report["endpoint"] == url
    assert qemu_io(url, "read -P 0x5a 4096 8192").returncode == 0

    # SIGKILL: the kernel ends its children (PR_SET_PDEATHSIG), nothing is orphaned
    agent.kill()
    agent.wait()
    wait_for(lambda: not any(running(p) for p in kids), 15, "children gone after SIGKILL")
    assert qemu_io(url, "read 0 512").returncode != 0
