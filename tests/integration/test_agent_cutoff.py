"""An agent cut off from the manager (a proxy between them closes) is marked down after the
heartbeat timeout, its volume is reported degraded, and it comes back up when the network
does. Its primary's lease runs out, so it refuses writes (ESHUTDOWN) before the manager
promotes the shadow on the other server (I3); once back, it is a shadow of the new primary."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shadowblk.manager.client import Client
from tests.agent_lab import agent_groups_fixture, serving, start_agent, wait_for  # noqa: F401
from tests.faultproxy import FaultProxy
from tests.manager_lab import start_manager
from tests.procs import Processes

TIMEOUT_S = 2.0  # the manager's heartbeat timeout


@dataclass
class CutOff:
    client: Client
    proxy: FaultProxy
    endpoint: str  # v1's primary on s1, the agent behind the proxy


@pytest.fixture
def fleet(procs: Processes, agent_groups: list[int], tmp_path: Path) -> Iterator[CutOff]:
    """s1 reaches the manager through a proxy, s2 directly; v1's primary is on s1."""
    lab = start_manager(
        procs, f"sqlite:{tmp_path / 'meta.db'}", tmp_path, "manager",
        "--heartbeat-timeout", str(TIMEOUT_S),
    )  # fmt: skip
    port = int(lab.url.rpartition(":")[2])
    with FaultProxy(port, seed=6) as proxy:
        via_proxy = f"http://127.0.0.1:{proxy.port}"
        start_agent(procs, agent_groups, via_proxy, lab.token_file, "s1", "a", tmp_path / "s1")
        start_agent(procs, agent_groups, lab.url, lab.token_file, "s2", "b", tmp_path / "s2")
        client = lab.client()
        client.create_volume(name="v1", size_bytes=1 << 20, shadows=1, primary="s1")
        report = wait_for(lambda: serving(client, "s1", "v1"), 15, "v1 served on s1")
        wait_for(lambda: serving(client, "s2", "v1"), 15, "v1's shadow hosted on s2")
        yield CutOff(client, proxy, report["endpoint"])


def test_cut_off_agent_is_marked_down_and_back_up(fleet: CutOff) -> None:
    client = fleet.client
    assert client.status()["volumes"]["degraded"] == []
    fleet.proxy.set_gate(False)
    wait_for(lambda: client.server("s1")["state"] == "down", TIMEOUT_S + 5, "s1 marked down")
    assert client.server("s2")["state"] == "up"
    assert client.status()["volumes"]["degraded"] == ["v1"]
    down = [e for e in client.events() if e["kind"] == "server-down"]
    assert [e["subject"] for e in down] == ["s1"]
    assert down[0]["detail"]["silent_s"] >= TIMEOUT_S  # not before the timeout

    # the emergency switchover moves the primary once s1's lease has run out; a heartbeat that
    # arrived before it would keep v1 on s1 (unit-tested in test_api_service.py), so the
    # network comes back only after the move
    wait_for(lambda: client.volume("v1")["primary"] == "s2", 15, "v1 moved to s2")
    fleet.proxy.set_gate(True)
    wait_for(lambda: client.server("s1")["state"] == "up", 10, "s1 up again")
    assert [e["subject"] for e in client.events() if e["kind"] == "server-up"] == ["s1"]
    volume = client.volume("v1")
    assert (volume["primary"], volume["generation"]) == ("s2", 2)
    wait_for(lambda: client.status()["volumes"]["degraded"] == [], 30, "s1 a shadow in step")


def test_cut_off_primary_refuses_writes(fleet: CutOff) -> None:
    fleet.proxy.set_gate(False)
    wait_for(lambda: fleet.client.server("s1")["state"] == "down", TIMEOUT_S + 5, "s1 down")
    write = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4096", fleet.endpoint],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert write.returncode != 0 or "error" in (write.stdout + write.stderr).lower()
    assert "transport endpoint shutdown" in write.stdout + write.stderr  # ESHUTDOWN: fenced
    wait_for(lambda: fleet.client.volume("v1")["primary"] == "s2", 15, "s2 promoted")
    promoted = wait_for(
        lambda: (r := serving(fleet.client, "s2", "v1")) and r["role"] == "primary" and r,
        15,
        "v1's primary served on s2",
    )
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x22 0 4096", promoted["endpoint"]],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    record = fleet.client.call("GET", "/v1/switchovers", volume="v1")["switchovers"][-1]
    assert (record["from"], record["to"], record["planned"]) == ("s1", "s2", False)
    assert record["outcome"] == "succeeded"
