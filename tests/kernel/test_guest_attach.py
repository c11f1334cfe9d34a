"""A QEMU guest (stock Debian kernel, TCG) whose virtio-blk disk is `shadowblk attach`'s NBD
endpoint, writing a verify pattern on it round after round (guest/virtio-pattern.sh) across a
planned switchover and an emergency one (kill -9 of the primary's agent), in sync mode: the
guest sees no I/O error (its dd, its kernel log) and every round reads back as written.

Its own boot, not the shared lab's: the fleet must run while the guest writes, and the host
moves the volume between the guest's rounds.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from tests.agent_lab import agent_groups_fixture, wait_for  # noqa: F401
from tests.integration.test_switchover_fio import router
from tests.procs import Processes
from tests.switchover_lab import start_attach, start_fleet
from tools.kernel_lab import GuestResult, run_guest

GUEST = Path(__file__).parent / "guest" / "virtio-pattern.sh"
BLOCKS = 256  # 1 MiB written and read back per round
GUEST_TIMEOUT_S = 420.0  # QEMU is killed then (the stop file normally ends it in seconds)


def rounds(out: Path) -> int:
    """The last round the guest verified (0 before the first)."""
    try:
        return int((out / "round").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def two_more_rounds(out: Path, what: str) -> None:
    start = rounds(out)
    wait_for(lambda: rounds(out) >= start + 2, 180, f"two rounds verified {what}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_guest_virtio_disk_on_attach_sees_no_error_across_switchovers(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    fleet = start_fleet(procs, agent_groups, tmp_path, mode="sync")
    start_attach(procs, fleet, hold_time=60)
    out = tmp_path / "guest"
    drive = f"file={fleet.attach_uri},format=raw,if=virtio"
    done: dict[str, GuestResult] = {}

    def boot() -> None:
        done["run"] = run_guest(
            f"#!/bin/sh\nexec sh /klab/{GUEST.name} /out /dev/vda {BLOCKS}\n", [],
            GUEST_TIMEOUT_S, out, files={GUEST.name: GUEST}, extra=["-drive", drive],
        )  # fmt: skip

    guest = threading.Thread(target=boot, name="guest")
    guest.start()
    try:
        wait_for(lambda: rounds(out) >= 1 or not guest.is_alive(), 300, "the guest writing")
        assert guest.is_alive(), "the guest ended before the switchovers"
        planned = fleet.switchover(to="s2", reason="guest test")
        assert planned["outcome"] == "succeeded", planned
        two_more_rounds(out, "after the planned switchover")
        wait_for(fleet.in_step, 60, "s1 a shadow of s2, in step")
        os.killpg(fleet.agents["s2"].pid, signal.SIGKILL)  # the agent, its serve, its shadow
        wait_for(lambda: fleet.primary() == "s1", 60, "the manager promoted s1")
        two_more_rounds(out, "after the emergency switchover")
        assert guest.is_alive(), "the guest ended during the switchovers"
    finally:
        (out / "stop").touch()
        guest.join(GUEST_TIMEOUT_S + 30)
    run = done["run"]
    run.check()  # rc 0: every round read back as written, no block error in dmesg
    assert "no I/O error" in run.console, run.console[-3000:]
    status = router(fleet)
    assert status["errors"] == 0 and status["expired"] == 0, status
    record = fleet.client.call("GET", "/v1/switchovers", volume="v1")["switchovers"]
    assert [(r["from"], r["to"], r["planned"], r["outcome"]) for r in record] == [
        ("s1", "s2", True, "succeeded"),
        ("s2", "s1", False, "succeeded"),
    ]
