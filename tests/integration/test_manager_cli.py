"""The whole manager CLI against a real manager process, with SQLite and with a real etcd:
servers registered by the agent protocol, then volume create / list / show / placement
explain / delete, server list / show and status, in text and --json."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcd import start_etcd
from tests.manager_lab import GiB, Lab, register_servers, start_manager
from tests.procs import SHADOWBLK, Processes

ZONES = {"s1": "a", "s2": "b", "s3": "c"}


@pytest.fixture(params=["sqlite", "etcd"])
def lab(request: pytest.FixtureRequest, procs: Processes, tmp_path: Path) -> Iterator[Lab]:
    if request.param == "sqlite":
        store = f"sqlite:{tmp_path / 'meta.db'}"
    else:
        store = start_etcd(procs, tmp_path / "etcd")[1].replace("http://", "etcd://")
    lab = start_manager(procs, store, tmp_path, "manager", "--heartbeat-timeout", "60")
    register_servers(lab)
    yield lab


def shadowblk(lab: Lab, *args: str, token: bool = True) -> subprocess.CompletedProcess:
    """The CLI as a process; the manager comes from SHADOWBLK_MANAGER, the token from a file."""
    env = {**os.environ, "SHADOWBLK_MANAGER": lab.url}
    env.pop("SHADOWBLK_TOKEN", None)
    tokens = ["--token-file", str(lab.token_file)] if token else []
    return subprocess.run(
        [*SHADOWBLK, *args, *tokens], env=env, capture_output=True, text=True, timeout=60
    )


def ok(lab: Lab, *args: str) -> str:
    done = shadowblk(lab, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def as_json(lab: Lab, *args: str):
    return json.loads(ok(lab, *args, "--json"))


def test_cli_against_a_manager(lab: Lab) -> None:
    servers = as_json(lab, "server", "list")
    assert [s["name"] for s in servers] == ["s1", "s2", "s3"]
    assert all(s["state"] == "up" for s in servers)
    listing = ok(lab, "server", "list")
    assert listing.splitlines()[0].split()[:3] == ["NAME", "STATE", "ZONE"]
    assert "200.0G" in listing
    assert as_json(lab, "server", "show", "s2")["capacity_bytes"] == 200 * GiB
    assert "zone / rack          b / r1" in ok(lab, "server", "show", "s2")

    made = as_json(lab, "volume", "create", "v1", "--size", "10G", "--shadows", "2")
    v1 = made["volume"]
    assert v1["size_bytes"] == 10 * GiB and v1["mode"] == "async" and v1["generation"] == 1
    # s2 is the emptiest: it gets the primary; the shadows go to the two other zones
    assert v1["primary"] == "s2"
    assert sorted(s["server"] for s in v1["shadows"]) == ["s1", "s3"]
    assert made["placement"]["primary"]["chosen"] == ["s2"]

    text = ok(lab, "volume", "create", "v2", "--size", "512M", "--mode", "sync", "--primary", "s3")
    assert "created v2" in text and "primary     s3" in text and "mode        sync" in text

    volumes = as_json(lab, "volume", "list")
    assert [v["name"] for v in volumes] == ["v1", "v2"]
    assert as_json(lab, "volume", "show", "v2")["size_bytes"] == 512 << 20
    assert "v1    10.0G" in ok(lab, "volume", "list")

    explained = ok(lab, "placement", "explain", "v1")
    assert "s2               rejected score 0.000  is the primary" in explained
    assert explained.count("CHOSEN") == 2
    assert "current shadows: s1, s3" in explained
    decision = as_json(lab, "placement", "explain", "v1")["decision"]
    assert sorted(decision["chosen"]) == ["s1", "s3"]

    status = as_json(lab, "status")
    assert status["servers"] == {"total": 3, "up": 3, "down": 0, "draining": 0}
    assert status["volumes"] == {"total": 2, "degraded": []}
    assert status["capacity"]["allocated_bytes"] == 3 * 10 * GiB + 2 * (512 << 20)
    assert status["manager"]["leading"] and status["leader"]["holder"] == lab.url
    assert "3 up, 0 down" in ok(lab, "status")

    assert as_json(lab, "volume", "delete", "v2")["primary"] == "s3"
    gone = shadowblk(lab, "volume", "show", "v2")
    assert gone.returncode == 1 and "no volume 'v2'" in gone.stderr
    # the agent protocol: s3's heartbeat carries the orders to host v2, then to drop it
    orders = lab.client().heartbeat("s3", used_bytes=0)["orders"]
    assert [(o["kind"], o["subject"]) for o in orders if o["subject"] == "v2"] == [
        ("host-volume", "v2"),
        ("drop-volume", "v2"),
    ]
    assert all(o["fence"] == status["leader"]["token"] for o in orders)


@pytest.mark.parametrize("lab", ["sqlite"], indirect=True)  # the messages do not depend on it
def test_cli_errors_are_clear(lab: Lab) -> None:
    no_token = shadowblk(lab, "volume", "create", "v9", "--size", "1G", token=False)
    assert no_token.returncode == 1
    assert "needs 'Authorization: Bearer TOKEN'" in no_token.stderr
    assert "--token-file" in no_token.stderr

    too_big = shadowblk(lab, "volume", "create", "v9", "--size", "1000T")
    assert too_big.returncode == 1
    assert "no server can hold the primary of v9" in too_big.stderr
    assert "not enough free space" in too_big.stderr

    # three zones: a third shadow has no failure domain left
    no_room = shadowblk(lab, "volume", "create", "v9", "--size", "1G", "--shadows", "3")
    assert no_room.returncode == 1 and "only 2 of 3 shadow(s) of v9" in no_room.stderr

    unknown = shadowblk(lab, "volume", "create", "v9", "--size", "1G", "--primary", "nope")
    assert unknown.returncode == 1 and "no server 'nope' is registered" in unknown.stderr

    bad_size = shadowblk(lab, "volume", "create", "v9", "--size", "ten")
    assert bad_size.returncode == 2 and "not a size" in bad_size.stderr

    assert shadowblk(lab, "server", "show", "s9").stderr == "Error: no server 's9'\n"
    assert as_json(lab, "volume", "list") == []

    env = {**os.environ, "SHADOWBLK_MANAGER": "http://127.0.0.1:9"}
    away = subprocess.run([*SHADOWBLK, "status"], env=env, capture_output=True, text=True)
    assert away.returncode == 1 and "cannot reach the manager at http://127.0.0.1:9" in away.stderr
