"""Planned switchover through the manager: the generation raised, the old primary fenced and
demoted (resynced from its bitmap, not copied), the shadow promoted, attach repointed at once;
the data written before reads back through attach after each move, and every move is recorded."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shadowblk.manager.client import ManagerError
from tests.agent_lab import agent_groups_fixture, serving, wait_for  # noqa: F401
from tests.procs import Processes
from tests.switchover_lab import Fleet, start_attach, start_fleet


def qemu_io(uri: str, command: str) -> str:
    done = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", command, uri], capture_output=True, text=True, timeout=60
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "error" not in out.lower() and "fail" not in out.lower(), out
    return out


@pytest.fixture
def fleet(procs: Processes, agent_groups: list[int], tmp_path: Path) -> Fleet:
    fleet = start_fleet(procs, agent_groups, tmp_path)
    start_attach(procs, fleet)
    return fleet


def test_planned_switchover_back_and_forth(fleet: Fleet) -> None:
    qemu_io(fleet.attach_uri, "write -P 0x51 0 1M")
    first = fleet.switchover(reason="maintenance")
    assert (first["outcome"], first["from"], first["to"]) == ("succeeded", "s1", "s2")
    assert first["generation"] == 2 and first["reason"] == "maintenance"
    assert first["old_primary"] == "resync"  # from the bitmap, never a full copy
    assert first["attachments"] == 1
    record = fleet.client.volume("v1")
    assert (record["primary"], record["generation"]) == ("s2", 2)
    qemu_io(fleet.attach_uri, "read -P 0x51 0 1M")
    qemu_io(fleet.attach_uri, "write -P 0x52 1M 1M")

    wait_for(fleet.in_step, 60, "the old primary resynced as a shadow")
    back = fleet.switchover(to="s1")
    assert (back["outcome"], back["to"], back["generation"]) == ("succeeded", "s1", 3)
    assert back["old_primary"] == "resync"
    qemu_io(fleet.attach_uri, "read -P 0x51 0 1M")
    qemu_io(fleet.attach_uri, "read -P 0x52 1M 1M")

    recorded = fleet.client.call("GET", "/v1/switchovers", volume="v1")["switchovers"]
    assert [(r["from"], r["to"], r["outcome"]) for r in recorded] == [
        ("s1", "s2", "succeeded"),
        ("s2", "s1", "succeeded"),
    ]
    for r in recorded:
        assert {"cas_ms", "fence_ms", "promote_ms", "repoint_ms"} <= set(r["timings_ms"])
        assert r["pause_seconds"] >= 0 and r["delta_bytes"] >= 0


def test_switchover_refusals(fleet: Fleet) -> None:
    client = fleet.client
    with pytest.raises(ManagerError) as err:
        client.call("POST", "/v1/volumes/nope/switchover", {})
    assert err.value.status == 404
    with pytest.raises(ManagerError) as err:
        client.call("POST", "/v1/volumes/v1/switchover", {"to": "s1"})  # the primary itself
    assert err.value.status == 409 and "no shadow" in str(err.value)
    with pytest.raises(ManagerError) as err:
        client.call("POST", "/v1/volumes/v1/switchover", {"to": 7})
    assert err.value.status == 422
    with pytest.raises(ManagerError) as err:
        fleet.lab.client(token=False).call("POST", "/v1/volumes/v1/switchover", {})
    assert err.value.status == 401
    assert client.volume("v1")["generation"] == 1  # nothing moved
