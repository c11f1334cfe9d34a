"""A manager for tests: the real `shadowblk manager` process on a free port, its token, and
storage servers registered the way an agent registers them (POST /v1/servers)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from shadowblk.manager.client import Client
from tests.procs import SHADOWBLK, Processes

GiB = 1 << 30

# for a fleet whose servers heartbeat only when the test says so: they stay up between beats
# however late the next beat comes on a loaded machine
BEAT_ON_DEMAND = ("manager", "--heartbeat-timeout", "3600")

# three zones, so that a volume can have a primary and two shadows in different failure domains
SERVERS = [
    {"name": "s1", "zone": "a", "rack": "r1", "capacity_bytes": 100 * GiB, "drive_models": ["M1"]},
    {"name": "s2", "zone": "b", "rack": "r1", "capacity_bytes": 200 * GiB, "drive_models": ["M2"]},
    {"name": "s3", "zone": "c", "rack": "r2", "capacity_bytes": 50 * GiB, "drive_models": ["M1"]},
]


@dataclass
class Lab:
    url: str
    token: str
    token_file: Path
    process: subprocess.Popen

    def client(self, token: bool = True) -> Client:
        return Client(self.url, self.token if token else None)


def start_manager(
    procs: Processes, store_url: str, workdir: Path, name: str = "manager", *extra: str
) -> Lab:
    """Start a manager on STORE_URL with a token file in WORKDIR; return once it is ready."""
    token_file = workdir / "token"
    if not token_file.exists():
        token_file.write_text("test-token-0123456789\n")
    proc = procs.start(
        [*SHADOWBLK, "-v", "manager", "--store", store_url, "--listen", "127.0.0.1:0",
         "--token-file", str(token_file), *extra],
        name=name,
    )  # fmt: skip
    url = procs.wait_ready(proc).removeprefix("ready ")
    return Lab(url, token_file.read_text().strip(), token_file, proc)


def register_servers(lab: Lab) -> None:
    """Register the lab's servers as their agents would, with a first heartbeat."""
    client = lab.client()
    for server in SERVERS:
        client.register(**server)
        client.heartbeat(server["name"], used_bytes=0, io_load=0.1)
