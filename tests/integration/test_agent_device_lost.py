"""A primary's lost device, as the udev rule reports it: `shadowblk notify-device remove
sbk-v1 DEVNODE` (what the rule's RUN starts) reaches the real agent s1 through its control
endpoint (found in its --run-dir), which asks the real manager for v1's emergency switchover
(POST /v1/volumes/v1/emergency): s2 takes over at once, no heartbeat timeout waited for, and
the `attach` router follows. The pyudev side of it runs in the kernel lab (tests/kernel/
test_udev.py): this host has no udev and no device-mapper."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from shadowblk.manager.client import Client, ManagerError
from shadowblk.ports import free_port
from tests.agent_lab import agent_groups_fixture, serving, wait_for  # noqa: F401
from tests.procs import SHADOWBLK, Processes
from tests.switchover_lab import SWITCHOVER_TIMEOUT_S, start_attach, start_fleet


def notify(run_dir: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SHADOWBLK, "notify-device", *argv, "--run-dir", str(run_dir), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def post(address: str, body: bytes, token: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{address}/v1/devices", data=body, method="POST")
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.load(err)


def write(uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 65536", "-c", "read -P 0x5a 0 65536",
         uri],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_removed_primary_device_switches_the_volume_over_at_once(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    runs = {name: tmp_path / f"run-{name}" for name in ("s1", "s2")}
    fleet = start_fleet(procs, agent_groups, tmp_path, timeout_s=3600,  # no heartbeat timeout
                        agent_args=lambda name: ("--run-dir", str(runs[name])))  # fmt: skip
    start_attach(procs, fleet)
    run_file = json.loads((runs["s1"] / "agent.json").read_text())
    assert (runs["s1"] / "agent.json").stat().st_mode & 0o077 == 0  # the local token: root's

    # not a loss of a primary here: s2 hosts only a shadow of v1; an add; another volume
    for run, argv in ((runs["s2"], ("remove", "sbk-v1", "/dev/dm-1")),
                      (runs["s1"], ("add", "sbk-v1", "/dev/dm-1")),
                      (runs["s1"], ("remove", "sbk-other", "/dev/dm-2"))):  # fmt: skip
        done = notify(run, *argv)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"emergency": False}
    # bad input: a clear refusal, the agent goes on
    assert post(run_file["control"], b'{"action": "remove", "name": "sbk-v1"}', "wrong")[0] == 401
    for body in (b"[]", b'{"action": "gone", "name": "sbk-v1"}', b'{"action": "remove"}',
                 b'{"action": "remove", "name": "v1"}', b"{not json"):  # fmt: skip
        status, doc = post(run_file["control"], body, run_file["token"])
        assert status == 400 and doc["error"], body
    done = notify(tmp_path / "nowhere", "remove", "sbk-v1")
    assert done.returncode == 1 and "no agent to notify" in done.stderr
    # the manager refuses a report from a server that is not v1's primary, and without a token
    try:
        fleet.client.call("POST", "/v1/volumes/v1/emergency", {"server": "s2", "reason": "x"})
        raise AssertionError("a report from s2 moved v1")
    except ManagerError as err:
        assert err.status == 409 and "not s2" in err.error
    try:
        fleet.lab.client(token=False).call("POST", "/v1/volumes/v1/emergency", {})
        raise AssertionError("an emergency without the token")
    except ManagerError as err:
        assert err.status == 401
    try:  # a report naming no server cannot be checked against the primary: refused
        fleet.client.call("POST", "/v1/volumes/v1/emergency", {"reason": "x"})
        raise AssertionError("a report without its server moved v1")
    except ManagerError as err:
        assert err.status == 422 and "server" in err.error, err
    assert fleet.primary() == "s1"

    # the primary's device goes: reported twice (the watcher and the rule would both), acted
    # on once
    done = notify(runs["s1"], "remove", "sbk-v1", "/dev/dm-7")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"emergency": True}
    assert json.loads(notify(runs["s1"], "remove", "sbk-v1", "/dev/dm-7").stdout) == {
        "emergency": False
    }
    wait_for(lambda: fleet.primary() == "s2", 60, "v1's emergency switchover to s2")
    (record,) = wait_for(
        lambda: fleet.client.call("GET", "/v1/switchovers")["switchovers"] or None,
        30,
        "the switchover record",
    )
    assert record["outcome"] == "succeeded", record
    assert (record["from"], record["to"], record["planned"]) == ("s1", "s2", False)
    assert "/dev/dm-7 is gone" in record["reason"]
    assert record["attachments"] == 1  # the router was repointed by the manager
    print(json.dumps({k: record[k] for k in ("pause_seconds", "timings_ms")}))  # reported only
    done = write(fleet.attach_uri)
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done


def test_an_unfenced_reporter_loses_its_lease_before_the_promotion_and_its_copy(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    """The reporter's agent cannot be fenced (its control address, as registered, answers
    nothing) while it goes on heartbeating: the generation is raised first, so its lease is
    not renewed any more, and the shadow is promoted only once it ran out (I3: the old
    primary refuses writes as soon as the switchover answers). Its copy, on the lost device,
    is no shadow any more: v1 gets a new one on the third server, and s1 no order to host v1."""
    fleet = start_fleet(procs, agent_groups, tmp_path, servers=3, timeout_s=5.0)
    old_endpoint = serving(fleet.client, "s1", "v1")["endpoint"]
    assert write(old_endpoint).returncode == 0
    s1 = fleet.client.server("s1")
    keys = ("name", "zone", "rack", "address", "nbd_address", "verify_address", "capacity_bytes",
            "drive_models")  # fmt: skip
    fleet.client.call(
        "POST",
        "/v1/servers",
        {**{k: s1[k] for k in keys}, "control_address": f"127.0.0.1:{free_port()}"},
    )
    since = fleet.client.call("GET", "/v1/events", since=0, limit=1000)["events"][-1]["seq"]

    slow = Client(fleet.lab.url, fleet.lab.token, timeout_s=SWITCHOVER_TIMEOUT_S)
    record = slow.call("POST", "/v1/volumes/v1/emergency", {"server": "s1", "reason": "test"})
    done = write(old_endpoint)
    assert done.returncode != 0 or "error" in (done.stdout + done.stderr).lower(), done
    assert record["outcome"] == "succeeded", record
    assert "lease ran out" in record["fence"] and not record["drained"], record
    assert fleet.client.server("s1")["state"] == "up"  # it heartbeated all along
    third = ({"s2", "s3"} - {record["to"]}).pop()
    assert "s1" not in [s["server"] for s in fleet.client.volume("v1")["shadows"]]
    wait_for(lambda: [s["server"] for s in fleet.client.volume("v1")["shadows"]] == [third],
             60, f"a new shadow of v1 on {third}")  # fmt: skip
    events = fleet.client.call("GET", "/v1/events", since=since, limit=1000)["events"]
    assert not [e for e in events
                if e["kind"] == "host-volume" and e["detail"]["server"] == "s1"]  # fmt: skip
    assert [e["detail"]["server"] for e in events if e["kind"] == "shadow-lost"] == ["s1"]
    # a repeated report (the agent's retry, a late duplicate) cannot move the new primary
    try:
        slow.call("POST", "/v1/volumes/v1/emergency", {"server": "s1", "reason": "again"})
        raise AssertionError("a second report moved v1")
    except ManagerError as err:
        assert err.status == 409, err
    assert fleet.primary() == record["to"]
