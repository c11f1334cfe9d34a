"""fio's nbd engine (the VM's client) through `attach` while the volume moves between servers:
five planned switchovers back and forth, and a kill -9 of the primary's agent with its
children (emergency switchover, sync mode). fio verifies every block it wrote (crc32c): zero
I/O errors, verification passes, and the router never answered an error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

from tests.agent_lab import agent_groups_fixture, wait_for  # noqa: F401
from tests.procs import Processes
from tests.switchover_lab import Fleet, start_attach, start_fleet


def fio(cwd: Path, uri: str, *extra: str) -> subprocess.Popen:
    """fio randwrite with its read-back verification; JSON results in CWD/job.json."""
    return subprocess.Popen(
        ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", "--bs=4k", "--size=32M",
         "--rw=randwrite", "--verify=crc32c", "--verify_fatal=1", "--randseed=7",
         "--output-format=json", f"--output={cwd / 'job.json'}", *extra],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def fio_passed(cwd: Path, proc: subprocess.Popen) -> dict:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"fio failed ({proc.returncode}): {err.decode()}"
    job = json.loads((cwd / "job.json").read_text())["jobs"][0]
    assert job["error"] == 0, job
    return job


def router(fleet: Fleet) -> dict:
    """The attach router's GET /status."""
    with urllib.request.urlopen(fleet.control + "/status", timeout=10) as reply:
        return json.load(reply)


def writing(fleet: Fleet, at_least: int) -> bool:
    return router(fleet)["requests"] >= at_least


def test_fio_verifies_across_five_planned_switchovers(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    fleet = start_fleet(procs, agent_groups, tmp_path)
    start_attach(procs, fleet)
    job = fio(tmp_path, fleet.attach_uri, "--iodepth=16", "--rate_iops=120")
    wait_for(lambda: writing(fleet, 200), 30, "fio writing through attach")
    moves = []
    for i in range(5):
        wait_for(fleet.in_step, 60, f"v1's shadow in step before switchover {i + 1}")
        record = fleet.switchover(reason=f"test {i + 1}")
        assert record["outcome"] == "succeeded", record
        moves.append((record["from"], record["to"], record["old_primary"]))
    assert job.poll() is None, "fio ended before the fifth switchover: the test proves less"
    assert moves == [("s1", "s2", "resync"), ("s2", "s1", "resync")] * 2 + [("s1", "s2", "resync")]
    fio_passed(tmp_path, job)
    status = router(fleet)
    assert status["errors"] == 0 and status["generation"] == 6, status


def test_fio_sync_mode_survives_kill_9_of_the_primary_agent(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    fleet = start_fleet(procs, agent_groups, tmp_path, mode="sync")
    start_attach(procs, fleet)
    job = fio(tmp_path, fleet.attach_uri, "--iodepth=4", "--fsync=1", "--rate_iops=200")
    wait_for(lambda: writing(fleet, 300), 30, "fio writing through attach")
    os.killpg(fleet.agents["s1"].pid, signal.SIGKILL)  # the agent, its serve and shadow server
    wait_for(lambda: fleet.primary() == "s2", 30, "the manager promoted s2")
    assert job.poll() is None, "fio ended before the switchover: the test proves less"
    fio_passed(tmp_path, job)
    status = router(fleet)
    assert status["errors"] == 0 and status["expired"] == 0, status
    assert status["generation"] == 2 and status["retries"] >= 1, status
    record = fleet.client.call("GET", "/v1/switchovers", volume="v1")["switchovers"][-1]
    assert (record["from"], record["to"], record["planned"]) == ("s1", "s2", False)
    assert record["outcome"] == "succeeded"
