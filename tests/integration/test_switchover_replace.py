"""A volume left with fewer live shadows than it wants gets a new one: one shadow on three
servers, the primary's agent killed (kill -9): the emergency switchover promotes the shadow, the
manager places a new shadow on the remaining server (the dead one's copy is retired), and the
new primary ships to it until it is in step, holding what was written before and after. The new
primary's `serve` takes the new shadow without a restart (the same process before and after),
and writes keep flowing to it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.agent_lab import agent_groups_fixture, children_of, wait_for  # noqa: F401
from tests.integration.test_switchover_planned import qemu_io
from tests.procs import Processes
from tests.switchover_lab import start_attach, start_fleet


def serving(agent_pid: int, image: Path) -> int:
    """The agent's child that has IMAGE open: the volume's `serve` (a zygote turned serve has
    the zygote's command line, so it is found by its open image)."""

    def has_open(pid: int) -> bool:
        fds = Path(f"/proc/{pid}/fd")
        try:
            return any(os.readlink(fds / fd) == str(image) for fd in os.listdir(fds))
        except OSError:  # gone meanwhile
            return False

    (pid,) = [kid for kid in children_of(agent_pid) if has_open(kid)]
    return pid


def test_a_lost_shadow_is_replaced_on_the_remaining_server(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    # sync mode: the write acknowledged just before the kill -9 is on the shadow (in async mode
    # it may legitimately be lost, and this test is about the new shadow's full sync)
    fleet = start_fleet(procs, agent_groups, tmp_path, servers=3, mode="sync")
    start_attach(procs, fleet)
    volume = fleet.client.volume("v1")
    (shadow,) = [s["server"] for s in volume["shadows"]]
    (spare,) = {"s2", "s3"} - {shadow}
    qemu_io(fleet.attach_uri, "write -P 0x81 0 2M")

    os.killpg(fleet.agents["s1"].pid, signal.SIGKILL)  # the agent, its serve and shadow server
    wait_for(lambda: fleet.primary() == shadow, 60, f"the manager promoted {shadow}")
    qemu_io(fleet.attach_uri, "write -P 0x82 2M 1M")  # through the new primary
    primary_image = tmp_path / shadow / "primaries" / "v1.img"
    serve_pid = serving(fleet.agents[shadow].pid, primary_image)

    def replaced() -> bool:
        shadows = fleet.client.volume("v1")["shadows"]
        return [(s["server"], s["state"]) for s in shadows] == [(spare, "in_sync")]

    wait_for(replaced, 120, f"a new shadow placed on {spare}, in step")
    events = fleet.client.call("GET", "/v1/events", since=0, limit=1000)["events"]
    (placed,) = [e for e in events if e["kind"] == "shadow-placed"]
    assert placed["detail"]["placed"] == [spare] and placed["detail"]["replaced"] == ["s1"]
    assert placed["detail"]["primary"] == shadow

    # the new shadow holds what was written before and after the failover (a full sync)
    image = tmp_path / spare / "shadows" / "v1.img"
    expected = b"\x81" * (2 << 20) + b"\x82" * (1 << 20)

    def synced() -> bool:
        with open(image, "rb") as f:
            return f.read(3 << 20) == expected

    wait_for(synced, 30, f"{spare}'s copy holding every write")
    # the same `serve` took the new shadow (no restart: the VM's I/O was not held for it)
    assert serving(fleet.agents[shadow].pid, primary_image) == serve_pid
    qemu_io(fleet.attach_uri, "write -P 0x83 3M 1M")  # and keeps shipping to it

    def streamed() -> bool:
        with open(image, "rb") as f:
            f.seek(3 << 20)
            return f.read(1 << 20) == b"\x83" * (1 << 20)

    wait_for(streamed, 30, f"a later write reaching {spare}'s copy")
    qemu_io(fleet.attach_uri, "read -P 0x81 0 2M")
    qemu_io(fleet.attach_uri, "read -P 0x82 2M 1M")
