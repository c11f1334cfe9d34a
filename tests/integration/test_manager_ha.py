"""A fleet with two real managers on a real etcd: kill -9 the leading one while a volume
replicates. A standby leads within 10 s, the agents (given both managers' URLs) keep
heartbeating through it, the volume keeps replicating to its shadow, and the new leader
places new volumes."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from shadowblk.manager.client import Client
from tests.agent_lab import agent_groups_fixture, serving, start_agent, wait_for  # noqa: F401
from tests.etcd import start_etcd
from tests.manager_lab import start_manager
from tests.procs import Processes

MiB = 1 << 20
LEASE_S = 3


def qemu_io(url: str, command: str) -> None:
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", command, url], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout + out.stderr


def shadow_holds(shadows_dir: Path, offset: int, pattern: bytes) -> bool:
    """Whether the one shadow image under SHADOWS_DIR holds PATTERN at OFFSET."""
    images = list(shadows_dir.glob("*.img"))
    if len(images) != 1:
        return False
    with open(images[0], "rb") as f:
        f.seek(offset)
        return f.read(len(pattern)) == pattern


def leader_url(client: Client) -> str | None:
    leader = client.status().get("leader")
    return leader["holder"] if leader else None


def test_kill_9_of_the_leading_manager(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    _, etcd = start_etcd(procs, tmp_path / "etcd")
    store = "etcd://" + etcd.removeprefix("http://")
    options = ("--heartbeat-timeout", "4", "--lease-ttl", str(LEASE_S))
    first = start_manager(procs, store, tmp_path, "m1", *options)
    both = Client(first.url, first.token)
    wait_for(lambda: leader_url(both) == first.url, 15, "m1 leads")
    second = start_manager(procs, store, tmp_path, "m2", *options)
    managers = f"{first.url},{second.url}"
    both = Client(managers, first.token)
    for name, zone in (("s1", "a"), ("s2", "b"), ("s3", "c")):
        start_agent(procs, agent_groups, managers, first.token_file, name, zone, tmp_path / name)

    both.create_volume(name="v1", size_bytes=4 * MiB, shadows=1, primary="s1")
    endpoint = wait_for(lambda: serving(both, "s1", "v1"), 20, "v1 served on s1")["endpoint"]
    shadow = both.volume("v1")["shadows"][0]["server"]
    shadows_dir = tmp_path / shadow / "shadows"
    qemu_io(endpoint, "write -P 0x21 0 65536")
    wait_for(lambda: shadow_holds(shadows_dir, 0, b"\x21" * 65536), 20, "the first write shadowed")

    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    killed_at = time.time()
    wait_for(lambda: leader_url(Client(second.url)) == second.url, 10, "m2 leads within 10 s")

    # replication never depended on the manager: writes keep reaching the shadow
    qemu_io(endpoint, "write -P 0x42 1048576 65536")
    wait_for(lambda: shadow_holds(shadows_dir, MiB, b"\x42" * 65536), 20, "a later write shadowed")

    # the agents found the new leader: heartbeats arrive there, no server was marked down
    def fresh() -> bool:
        servers = Client(second.url).servers()
        return all(s["state"] == "up" and s["last_heartbeat"] > killed_at for s in servers)

    wait_for(fresh, 10, "every agent heartbeating to m2")
    assert [e for e in both.events() if e["kind"] == "server-down"] == []

    # and the new leader places and hosts new volumes through the same client
    both.create_volume(name="v2", size_bytes=MiB, shadows=1, primary="s2")
    url = wait_for(lambda: serving(both, "s2", "v2"), 20, "v2 served on s2")["endpoint"]
    qemu_io(url, "write -P 0x33 0 4096")
    assert both.url == second.url
