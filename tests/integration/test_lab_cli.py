"""The whole CLI against `shadowblk lab up` (SQLite and etcd): servers registered by real
agents, a volume whose primary is served by the agent the manager chose (nbdinfo and qemu-io
through the endpoint it reports) and whose shadow is hosted elsewhere, delete, `lab down`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from shadowblk.cli.agent import serve_has_shadows
from shadowblk.manager.client import Client
from tests.agent_lab import children_of, hosted, running, serving, wait_for
from tests.predict_lab import DATA
from tests.procs import SHADOWBLK, Processes

MiB = 1 << 20
REPLICATION = serve_has_shadows()  # `serve` ships to shadows: their files must appear
FAILING = "9VS1QC90"  # a drive of the shared data that failed on 2014-05-24


def cli(lab: dict[str, Any], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHADOWBLK_MANAGER": lab["manager"]["url"]}
    env.pop("SHADOWBLK_TOKEN", None)
    return subprocess.run(
        [*SHADOWBLK, *args, "--token-file", lab["manager"]["token_file"]],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def as_json(lab: dict[str, Any], *args: str) -> Any:
    done = cli(lab, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def accepts(endpoint: str) -> bool:
    """Whether something listens at the HOST:PORT of ENDPOINT (any scheme)."""
    parts = urlsplit(endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("store", ["sqlite", "etcd"])
def test_cli_against_a_lab(procs: Processes, tmp_path: Path, store: str) -> None:
    lab_dir = tmp_path / "lab"
    up = procs.start(
        [*SHADOWBLK, "lab", "up", "--servers", "3", "--dir", str(lab_dir), "--store", store,
         "--capacity", "2G", "--heartbeat-interval", "0.3"],
        name="lab",
    )  # fmt: skip
    ready = procs.wait_ready(up, timeout=90)
    lab = json.loads((lab_dir / "lab.json").read_text())
    assert ready == f"ready {lab['manager']['url']}"
    assert (lab["etcd"] is not None) == (store == "etcd")
    assert lab["store"].startswith("etcd://" if store == "etcd" else "sqlite:")

    servers = as_json(lab, "server", "list")
    assert [(s["name"], s["zone"], s["state"]) for s in servers] == [
        ("s1", "z1", "up"), ("s2", "z2", "up"), ("s3", "z3", "up"),
    ]  # fmt: skip
    assert all(s["capacity_bytes"] == 2 << 30 for s in servers)

    created = as_json(lab, "volume", "create", "v1", "--size", "64M", "--shadows", "1")
    primary = created["volume"]["primary"]
    (shadow,) = [s["server"] for s in created["volume"]["shadows"]]
    assert shadow != primary
    client = Client(lab["manager"]["url"])
    url = wait_for(lambda: serving(client, primary, "v1"), 20, "v1 served")["endpoint"]
    assert url.startswith("nbd://127.0.0.1:") and url.endswith("/v1")
    info = subprocess.run(["nbdinfo", "--size", url], capture_output=True, text=True, timeout=30)
    assert info.stdout.strip() == str(64 * MiB), info.stderr
    write = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0xc3 1M 64k", "-c", "read -P 0xc3 1M 64k", url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert write.returncode == 0 and "Pattern verification failed" not in write.stdout
    agent = {a["name"]: a for a in lab["agents"]}
    image = Path(agent[primary]["data_dir"]) / "primaries" / "v1.img"
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(64 << 10) == b"\xc3" * (64 << 10)

    # the shadow: hosted by its agent's shadow server, at the address it registered
    report = wait_for(lambda: serving(client, shadow, "v1"), 20, "v1's shadow hosted")
    assert report["role"] == "shadow"
    assert report["endpoint"] == f"shadow://{client.server(shadow)['address']}"
    assert accepts(report["endpoint"])
    shadows_dir = Path(agent[shadow]["data_dir"]) / "shadows"
    if REPLICATION:
        wait_for(lambda: list(shadows_dir.glob("v1.*")), 30, "v1's shadow files")
    assert hosted(client, next(n for n in agent if n not in (primary, shadow)), "v1") is None

    status = as_json(lab, "status")
    assert status["servers"]["up"] == 3 and status["volumes"]["degraded"] == []

    # delete: the primary's agent stops serving it and removes its files
    assert cli(lab, "volume", "delete", "v1").returncode == 0
    wait_for(lambda: hosted(client, primary, "v1") is None, 20, "v1 dropped by its primary")
    wait_for(lambda: hosted(client, shadow, "v1") is None, 20, "v1 dropped by its shadow")
    assert not image.exists() and not accepts(url)

    # down: everything lab.json lists ends, and lab.json goes
    pids = [lab["pid"], lab["manager"]["pid"], *(a["pid"] for a in lab["agents"])]
    pids += [lab["etcd"]["pid"]] if lab["etcd"] else []
    pids += [kid for a in lab["agents"] for kid in children_of(a["pid"])]  # shadow servers
    done = lab_down(lab_dir)
    assert done.returncode == 0, done.stderr
    assert up.wait(10) == 0
    assert not any(running(pid) for pid in pids)
    assert not (lab_dir / "lab.json").exists()
    again = lab_down(lab_dir)
    assert again.returncode == 1 and "no lab runs" in again.stderr


def lab_down(lab_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SHADOWBLK, "lab", "down", "--dir", str(lab_dir)], capture_output=True, text=True,
        timeout=90,
    )  # fmt: skip


def lab_up(lab_dir: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SHADOWBLK, "lab", "up", "--dir", str(lab_dir), *options],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_lab_options_for_the_predictor(procs: Processes, tmp_path: Path) -> None:
    """A replayed drive on one agent and the manager's trigger settings reach the processes
    (what the demo's predictive act runs); bad values are usage errors before anything starts."""
    lab_dir = tmp_path / "lab"
    bad_model = tmp_path / "model.json"
    bad_model.write_text('{"format": "shadowblk-smart-model", "format_version": 99}\n')
    for options, error in (
        (("--smart-replay", f"s3={DATA}"), "no server 's3' in this lab (s1..s2)"),
        (("--smart-replay", "s1"), "'s1' is not SERVER=VALUE"),
        (("--smart-replay", f"s1={tmp_path / 'none.csv'}"), "s1: no file"),
        (("--smart-serial", "s1=X"), "no --smart-replay for s1"),
        (("--preempt-sustain", "soon"), "'soon' is not a duration"),
        (("--model", str(bad_model)), "format_version 99 is not supported"),
    ):
        out = lab_up(lab_dir, "--servers", "2", *options)
        assert out.returncode == 2 and error in out.stderr, (options, out.stderr)
        assert "Traceback" not in out.stderr and not (lab_dir / "lab.json").exists()

    up = procs.start(
        [*SHADOWBLK, "lab", "up", "--dir", str(lab_dir), "--servers", "2",
         "--heartbeat-interval", "0.3", "--preempt-threshold", "0.7", "--preempt-sustain", "10m",
         "--preempt-dry-run", "--smart-replay", f"s1={DATA}", "--smart-serial", f"s1={FAILING}",
         "--replay-start", "s1=2014-05-20", "--replay-speed", "2"],
        name="lab",
    )  # fmt: skip
    procs.wait_ready(up, timeout=120)
    lab = json.loads((lab_dir / "lab.json").read_text())
    assert lab["manager"]["predictor"] == {
        "model": None, "threshold": 0.7, "sustain": "10m", "dry_run": True,
    }  # fmt: skip
    replays = {a["name"]: a["smart_replay"] for a in lab["agents"]}
    assert replays == {
        "s1": {"file": str(DATA), "serial": FAILING, "start": "2014-05-20", "speed": 2.0},
        "s2": None,
    }
    client = Client(lab["manager"]["url"])

    def health(name: str) -> dict[str, Any]:
        return client.server(name).get("health", {})

    replay = wait_for(lambda: health("s1").get("smart", {}).get("replay"), 30, "s1's replay")
    assert replay["date"] >= "2014-05-20" and replay["last_date"] == "2014-05-24"
    assert replay["ends_in_failure"] and replay["speed_days_per_second"] == 2.0
    assert health("s1")["smart"]["devices"]["replay"]["serial"] == FAILING
    assert "replay" not in health("s2").get("smart", {})
    trigger = wait_for(lambda: health("s2").get("failure", {}).get("trigger"), 30, "s2 judged")
    assert (trigger["threshold"], trigger["sustain_seconds"], trigger["dry_run"]) == (
        0.7, 600.0, True,
    )  # fmt: skip
    done = lab_down(lab_dir)
    assert done.returncode == 0, done.stderr
    assert up.wait(10) == 0
