"""The operator's commands: `shadowblk switchover` (text and --json, with its timings),
`shadowblk server drain`, and the switchovers in `shadowblk status`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.agent_lab import agent_groups_fixture, wait_for  # noqa: F401
from tests.procs import SHADOWBLK, Processes
from tests.switchover_lab import Fleet, start_fleet


def cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHADOWBLK_MANAGER": fleet.lab.url}
    return subprocess.run(
        [*SHADOWBLK, *args, "--token-file", str(fleet.lab.token_file)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_switchover_drain_and_status(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    fleet = start_fleet(procs, agent_groups, tmp_path)
    done = cli(fleet, "switchover", "v1", "--to", "s2", "--reason", "disk swap", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert (record["from"], record["to"], record["reason"]) == ("s1", "s2", "disk swap")
    assert record["timings_ms"]["fence_ms"] >= 0

    wait_for(fleet.in_step, 60, "s1 in step as a shadow")
    done = cli(fleet, "switchover", "v1")
    assert done.returncode == 0, done.stderr
    assert "v1: s2 -> s1 (generation 3, reason: operator)" in done.stdout
    for line in ("pause", "last delta", "old primary     resync", "fence_ms", "promote_ms",
                 "checksums       match: "):  # fmt: skip
        assert line in done.stdout, done.stdout

    refused = cli(fleet, "switchover", "v1", "--to", "nope")
    assert refused.returncode == 1 and "Error: to: no server 'nope'" in refused.stderr

    wait_for(fleet.in_step, 60, "s2 in step as a shadow")
    done = cli(fleet, "server", "drain", "s1", "--json")
    assert done.returncode == 0, done.stderr
    (moved,) = json.loads(done.stdout)["switchovers"]
    assert (moved["from"], moved["to"], moved["outcome"]) == ("s1", "s2", "succeeded")
    assert fleet.client.server("s1")["state"] == "draining"
    assert cli(fleet, "server", "drain", "s1").stdout.strip() == "no primary on s1"

    status = cli(fleet, "status")
    assert status.returncode == 0, status.stderr
    assert "switchover v1 s1 -> s2 succeeded (planned, pause" in status.stdout
    assert len(json.loads(cli(fleet, "status", "--json").stdout)["switchovers"]) == 3
