"""Online failure prediction on a lab fleet of real processes: a manager with the SMART model,
agents heartbeating, volumes served, fio as the load.

- A failing drive's recorded days replayed into one agent: its probability rises with the SMART
  reasons shown by `server show --json`, and the trigger (dry run) records its decision before
  the recorded failure day.
- A slow backing store injected into one agent while fio runs: its latency is flagged.
- A healthy agent under a load that changes rate: never flagged.
- Not a dry run: the failing drive's server is drained while fio verifies through attach.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shadowblk.manager.client import Client
from tests.agent_lab import agent_groups_fixture, serving, start_agent, wait_for  # noqa: F401
from tests.manager_lab import Lab, start_manager
from tests.predict_lab import DATA, train, write_sample
from tests.procs import SHADOWBLK, Processes

# A Seagate ST31500341AS that failed on 2014-05-24 and is not in the model's training sample.
# The sample model scores it under 0.05 until 2014-05-04 and over 0.55 from 2014-05-05 (its
# reallocated sectors jump) to the end: a drive whose warning comes weeks before it fails.
FAILING = "9VS1QC90"
FAILURE_DATE = "2014-05-24"
REPLAY_START = "2014-04-24"  # 30 recorded days before the failure, at one day a second (the
# agent's default speed)
PREEMPT = ("--preempt-threshold", "0.5", "--preempt-sustain", "3s", "--preempt-dry-run")


@pytest.fixture(scope="module")
def smart_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("smart-model")
    model = work / "model.json"
    out = train(write_sample(work / "sample.csv.gz"), model)
    assert out.returncode == 0, out.stderr
    return model


@dataclass
class Fleet:
    lab: Lab
    client: Client
    dirs: Path


@pytest.fixture
def fleet(
    procs: Processes, agent_groups: list[int], smart_model: Path, tmp_path: Path
) -> Iterator[Fleet]:
    lab = start_manager(
        procs, f"sqlite:{tmp_path / 'store.db'}", tmp_path, "manager", "--model", str(smart_model),
        *PREEMPT,
    )  # fmt: skip
    yield Fleet(lab, lab.client(), tmp_path)


def agent(
    fleet: Fleet, procs: Processes, groups: list[int], name: str, zone: str, *extra: str
) -> None:
    lab = fleet.lab
    start_agent(procs, groups, lab.url, lab.token_file, name, zone, fleet.dirs / name, *extra)


def failure(client: Client, server: str) -> dict[str, Any]:
    return client.server(server).get("health", {}).get("failure") or {}


def preempts(client: Client, server: str) -> list[dict[str, Any]]:
    events = client.events(0, 1000)
    return [e for e in events if e["kind"] == "failure-preempt" and e["subject"] == server]


def volume_on(fleet: Fleet, name: str, primary: str) -> str:
    """Create volume NAME with its primary on PRIMARY; its NBD URI once served."""
    fleet.client.create_volume(name=name, size_bytes=64 << 20, primary=primary, shadows=1)
    report = wait_for(lambda: serving(fleet.client, primary, name), 60, f"{name} served")
    return report["endpoint"]


def fio(cwd: Path, uri: str, *phases: tuple[int, int]) -> subprocess.Popen:
    """Random 4 KiB reads and writes through URI, one fio job per (IOPS, seconds) phase, one
    after the other."""
    argv = ["fio", "--ioengine=nbd", f"--uri={uri}", "--bs=4k", "--size=32M", "--rw=randrw",
            "--randseed=11", "--time_based", "--iodepth=4", "--output-format=json",
            f"--output={cwd / 'fio.json'}"]  # fmt: skip
    for i, (iops, seconds) in enumerate(phases):
        argv += [f"--name=phase{i}", f"--rate_iops={iops}", f"--runtime={seconds}"]
        argv += ["--stonewall"] if i else []
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def fio_done(proc: subprocess.Popen, cwd: Path) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert all(job["error"] == 0 for job in json.loads((cwd / "fio.json").read_text())["jobs"])


def test_a_replayed_failing_drive_triggers_before_its_failure_day(
    fleet: Fleet, procs: Processes, agent_groups: list[int]
) -> None:
    agent(fleet, procs, agent_groups, "s2", "b")
    replay = ("--smart-replay", str(DATA), "--smart-serial", FAILING)
    agent(fleet, procs, agent_groups, "s1", "a", *replay, "--replay-start", REPLAY_START)
    client = fleet.client
    # before the drive's warning (placement avoids a server at risk): a primary on s1
    client.create_volume(name="v1", size_bytes=64 << 20, primary="s1", shadows=1)
    wait_for(lambda: failure(client, "s1").get("signals"), 30, "s1 scored")
    early = failure(client, "s1")
    assert early["signals"]["smart"]["replay"]["date"] < "2014-05-04"
    assert early["probability"] < 0.2
    (event,) = wait_for(lambda: preempts(client, "s1") or None, 60, "the trigger fired for s1")
    detail = event["detail"]
    assert detail["dry_run"] and detail["action"] == "report"
    assert detail["primaries"] == ["v1"]
    replay = detail["smart"]["replay"]
    assert replay["last_date"] == FAILURE_DATE and replay["ends_in_failure"]
    assert replay["date"] < FAILURE_DATE
    assert detail["probability"] >= 0.5 and "smart" in detail["reason"]

    shown = subprocess.run(
        [*SHADOWBLK, "server", "show", "s1", "--json", "--manager", fleet.lab.url],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    server = json.loads(shown.stdout)
    risk = server["health"]["failure"]
    assert server["failure_probability"] == risk["probability"] > early["probability"]
    assert risk["reasons"][0].startswith("smart: P(any of 1 disks fails in 30 d)")
    disk = risk["signals"]["smart"]["disks"]["replay"]
    assert disk["serial"] == FAILING and disk["drivers"]
    assert risk["trigger"]["state"] == "fired"
    assert not preempts(client, "s2")
    assert failure(client, "s2")["trigger"]["state"] == "armed"
    with urllib.request.urlopen(f"{fleet.lab.url}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    (family,) = [f for f in text_string_to_metric_families(text)
                 if f.name == "shadowblk_server_failure_probability"]  # fmt: skip
    scraped = {s.labels["server"]: s.value for s in family.samples}
    assert scraped["s1"] >= 0.5 and scraped["s2"] < 0.1


def latency_of(client: Client, server: str) -> dict[str, Any]:
    return (failure(client, server).get("signals") or {}).get("latency") or {}


def test_a_slow_backing_store_is_flagged(
    fleet: Fleet, procs: Processes, agent_groups: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    delay = fleet.dirs / "io-delay-ms"
    monkeypatch.setenv("SHADOWBLK_TEST_IO_DELAY_FILE", str(delay))
    agent(fleet, procs, agent_groups, "s1", "a")
    monkeypatch.delenv("SHADOWBLK_TEST_IO_DELAY_FILE")
    agent(fleet, procs, agent_groups, "s2", "b")
    uri = volume_on(fleet, "v1", "s1")
    client = fleet.client
    load = fio(fleet.dirs, uri, (200, 90))
    try:
        wait_for(lambda: latency_of(client, "s1").get("spike_share") is not None, 60, "baseline")
        assert not latency_of(client, "s1")["flagged"]
        delay.write_text("20\n")
        flagged = wait_for(lambda: latency_of(client, "s1").get("flagged"), 30, "s1 flagged")
        assert flagged
        risk = failure(client, "s1")
        assert any(r.startswith("latency: spike share") for r in risk["reasons"])
        assert not latency_of(client, "s2").get("flagged")
    finally:
        load.terminate()
        load.communicate(timeout=60)


def test_a_healthy_server_under_a_changing_load_is_never_flagged(
    fleet: Fleet, procs: Processes, agent_groups: list[int]
) -> None:
    agent(fleet, procs, agent_groups, "s1", "a")
    agent(fleet, procs, agent_groups, "s2", "b")
    uri = volume_on(fleet, "v1", "s1")
    client = fleet.client
    load = fio(fleet.dirs, uri, (100, 20), (600, 20), (30, 20), (300, 20))
    judged = polls = 0
    while load.poll() is None:
        latency = latency_of(client, "s1")
        assert not latency.get("flagged"), latency
        judged += latency.get("spike_share") is not None
        polls += 1
        time.sleep(0.5)
    fio_done(load, fleet.dirs)
    # the detector judged most of the run (a share of the polls: how many fit in the run
    # depends on the machine's load)
    assert polls >= 20 and judged > 0.6 * polls, (judged, polls)
    assert not preempts(client, "s1")


def test_bad_replay_and_model_files_are_clear_errors(smart_model: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.csv"
    garbage.write_text("date,serial_number,model,failure,smart_5_raw\n2016-01-01,A,M,0,lots\n")
    missing = tmp_path / "missing.csv"
    missing.write_text("serial_number,model,smart_5\nA,M,0\n")
    agent = [*SHADOWBLK, "agent", "--manager", "http://127.0.0.1:9", "--name", "s1", "--zone",
             "a", "--data-dir", str(tmp_path / "s1"), "--listen", "127.0.0.1:0", "--nbd-listen",
             "127.0.0.1:0", "--smart-replay"]  # fmt: skip
    for path, error in (
        (garbage, "column 'smart_5_raw' is 'lots', not a number"),
        (missing, "daily CSV without column(s) date, failure"),
    ):
        out = subprocess.run([*agent, str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and error in out.stderr and "Traceback" not in out.stderr
    future = tmp_path / "future.json"
    future.write_text(json.dumps(json.loads(smart_model.read_text()) | {"format_version": 99}))
    out = subprocess.run(
        [*SHADOWBLK, "manager", "--store", f"sqlite:{tmp_path / 'store.db'}", "--listen",
         "127.0.0.1:0", "--state-dir", str(tmp_path), "--model", str(future)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1 and "format_version 99 is not supported" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_failing_drive_moves_its_volume_before_the_failure_day(
    procs: Processes, agent_groups: list[int], smart_model: Path, tmp_path: Path
) -> None:
    """Not a dry run: the trigger drains s1 while fio writes through attach, and fio's
    verification passes."""
    from tests.integration.test_switchover_fio import fio as fio_verify
    from tests.integration.test_switchover_fio import fio_passed
    from tests.switchover_lab import Fleet as Switching
    from tests.switchover_lab import start_attach

    lab = start_manager(
        procs, f"sqlite:{tmp_path / 'store.db'}", tmp_path, "manager", "--model", str(smart_model),
        "--preempt-threshold", "0.5", "--preempt-sustain", "3s", "--heartbeat-timeout", "2",
    )  # fmt: skip
    client = lab.client()
    agents = {"s2": start_agent(procs, agent_groups, lab.url, lab.token_file, "s2", "b",
                                tmp_path / "s2")}  # fmt: skip
    # a quarter of a recorded day a second: the warning (2014-05-05) comes ~45 s after start
    replay = ("--smart-replay", str(DATA), "--smart-serial", FAILING,
              "--replay-start", REPLAY_START, "--replay-speed", "0.25")  # fmt: skip
    agents["s1"] = start_agent(
        procs, agent_groups, lab.url, lab.token_file, "s1", "a", tmp_path / "s1", *replay
    )
    client.create_volume(name="v1", size_bytes=64 << 20, primary="s1", shadows=1)
    fleet = Switching(lab, client, agents, "v1")
    wait_for(lambda: serving(client, "s1", "v1"), 30, "v1 served on s1")
    wait_for(fleet.in_step, 60, "v1's shadow in step")
    start_attach(procs, fleet)
    job = fio_verify(tmp_path, fleet.attach_uri, "--iodepth=8", "--rate_iops=120")

    wait_for(lambda: fleet.primary() == "s2", 150, "v1 moved off the failing s1")
    assert job.poll() is None, "fio ended before the move: the test proves less"
    (event,) = preempts(client, "s1")
    detail = event["detail"]
    assert detail["action"] == "drain" and not detail["dry_run"] and detail["primaries"] == ["v1"]
    assert detail["smart"]["replay"]["date"] < FAILURE_DATE
    (move,) = wait_for(
        lambda: client.call("GET", "/v1/switchovers", volume="v1")["switchovers"] or None,
        60,
        "the move recorded",
    )
    assert (move["from"], move["to"], move["outcome"]) == ("s1", "s2", "succeeded"), move
    fio_passed(tmp_path, job)
