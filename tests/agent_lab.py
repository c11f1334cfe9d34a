"""Agents for tests: the real `shadowblk agent` process against a manager, the volumes it
reports hosting, and a teardown that ends each agent's whole process group (its `serve` and
`shadow` children too, even after the agent itself was killed with SIGKILL)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shadowblk.manager.client import Client
from tests.procs import SHADOWBLK, Processes

T = TypeVar("T")


@pytest.fixture(name="agent_groups")
def agent_groups_fixture(procs: Processes) -> Iterator[list[int]]:
    """Process groups of started agents (procs starts each in its own session): SIGKILLed
    at teardown, so no child outlives the test whatever happened to its agent."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def start_agent(
    procs: Processes,
    groups: list[int],
    manager_url: str,
    token_file: Path,
    name: str,
    zone: str,
    data_dir: Path,
    *extra: str,
    interval: float = 0.3,
) -> subprocess.Popen:
    """Start an agent on free loopback ports; return once it has registered."""
    key = data_dir.parent / "hmac.key"
    if not key.exists():
        key.write_text("lab-hmac-key-0123456789abcdef\n")
    proc = procs.start(
        [*SHADOWBLK, "agent", "--manager", manager_url, "--token-file", str(token_file),
         "--name", name, "--zone", zone, "--data-dir", str(data_dir),
         "--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0", "--capacity", "4G",
         "--interval", str(interval), "--hmac-key-file", str(key), *extra],
        name=name,
    )  # fmt: skip
    groups.append(proc.pid)
    assert procs.wait_ready(proc, timeout=60) == f"ready agent {name} {manager_url}"
    return proc


def wait_for(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll PROBE until it returns something other than None or False; fail after TIMEOUT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result is not None and result is not False:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def hosted(client: Client, server: str, volume: str) -> dict[str, Any] | None:
    """What SERVER's agent last reported about VOLUME (role, state, endpoint), if anything."""
    return client.server(server).get("health", {}).get("hosted", {}).get(volume)


def serving(client: Client, server: str, volume: str) -> dict[str, Any] | None:
    """VOLUME's report from SERVER once its process serves it (state running, an endpoint)."""
    report = hosted(client, server, volume)
    return report if report and report["state"] == "running" else None


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is PID, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def child_running(pid: int, command: str) -> int:
    """The one child of PID that runs `shadowblk COMMAND`."""
    (child,) = [
        kid
        for kid in children_of(pid)
        if f"shadowblk.cli\0{command}\0".encode() in Path(f"/proc/{kid}/cmdline").read_bytes()
    ]
    return child


def running(pid: int) -> bool:
    """Whether PID exists and is not a zombie."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
