"""A fleet for switchover tests: a real manager, real agents, one replicated volume, and an
`attach` router following the manager (registered, so switchovers push their repoints)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shadowblk.manager.client import Client
from shadowblk.ports import free_port
from tests.agent_lab import serving, start_agent, wait_for
from tests.manager_lab import Lab, start_manager
from tests.procs import SHADOWBLK, Processes

MiB = 1 << 20
SWITCHOVER_TIMEOUT_S = 180.0  # a loaded machine starts the standby `serve` slowly


@dataclass
class Fleet:
    lab: Lab
    client: Client
    agents: dict[str, subprocess.Popen]
    volume: str
    attach_uri: str = ""
    control: str = ""
    attach: subprocess.Popen | None = None
    dirs: dict[str, Path] = field(default_factory=dict)

    def primary(self) -> str:
        return self.client.volume(self.volume)["primary"]

    def in_step(self) -> bool:
        """Every wanted shadow is reported in step by the current primary, and reports itself
        a shadow at the current generation with an applied epoch: what a planned switchover
        needs of its target (right after a switchover the primary can report the old primary in
        step before that server's own heartbeat says it is a shadow again)."""
        record = self.client.volume(self.volume)
        states = [s["state"] for s in record["shadows"]]
        if len(states) < record["shadows_wanted"] or any(s != "in_sync" for s in states):
            return False
        for shadow in record["shadows"]:
            health = self.client.server(shadow["server"]).get("health") or {}
            report = (health.get("hosted") or {}).get(self.volume, {})
            if (report.get("role"), report.get("generation")) != ("shadow", record["generation"]):
                return False
            if report.get("epoch", 0) <= 0:
                return False
        return True

    def switchover(self, to: str | None = None, reason: str = "test") -> dict[str, Any]:
        body = {"reason": reason, **({"to": to} if to else {})}
        slow = Client(self.lab.url, self.lab.token, timeout_s=SWITCHOVER_TIMEOUT_S)
        return slow.call("POST", f"/v1/volumes/{self.volume}/switchover", body)


def start_fleet(
    procs: Processes,
    groups: list[int],
    tmp_path: Path,
    servers: int = 2,
    size: int = 64 * MiB,
    mode: str = "async",
    timeout_s: float = 2.0,
    shadows: int = 1,
    agent_args: Callable[[str], tuple[str, ...]] = lambda name: (),
    block_size: int = 4096,
) -> Fleet:
    """A manager, SERVERS agents s1.. (zones a, b, ...; each with AGENT_ARGS(name) too), volume
    v1 with its primary on s1, its shadows in step."""
    lab = start_manager(
        procs, f"sqlite:{tmp_path / 'meta.db'}", tmp_path, "manager",
        "--heartbeat-timeout", str(timeout_s),
    )  # fmt: skip
    agents, dirs = {}, {}
    for i in range(1, servers + 1):
        name = f"s{i}"
        dirs[name] = tmp_path / name
        agents[name] = start_agent(
            procs, groups, lab.url, lab.token_file, name, "abcdefgh"[i - 1], dirs[name],
            *agent_args(name),
        )  # fmt: skip
    client = lab.client()
    client.create_volume(name="v1", size_bytes=size, shadows=shadows, primary="s1", mode=mode,
                         block_size=block_size)  # fmt: skip
    fleet = Fleet(lab, client, agents, "v1", dirs=dirs)
    wait_for(lambda: serving(client, "s1", "v1"), 30, "v1 served on s1")
    wait_for(fleet.in_step, 60, "v1's shadows in step")
    return fleet


def start_attach(procs: Processes, fleet: Fleet, hold_time: float = 30.0) -> None:
    """`shadowblk attach v1 --manager URL` with a control endpoint and the token."""
    control = f"127.0.0.1:{free_port()}"
    proc = procs.start(
        [*SHADOWBLK, "-v", "attach", fleet.volume, "--listen", "127.0.0.1:0",
         "--manager", fleet.lab.url, "--token-file", str(fleet.lab.token_file),
         "--control", control, "--hold-time", str(hold_time), "--poll", "0.5"],
        name="attach",
    )  # fmt: skip
    fleet.attach_uri = procs.wait_ready(proc, timeout=60).removeprefix("ready ")
    fleet.control, fleet.attach = f"http://{control}", proc
    url = fleet.control
    wait_for(
        lambda: url in fleet.client.volume(fleet.volume).get("attachments", []),
        15,
        "attach registered with the manager",
    )
