"""The manager's HTTP API over the wire: bad input gets a clear 4xx, changes need the token,
silent servers go down and come back, a standby refuses changes and names the leader, and
SIGTERM stops a manager cleanly (its standby then leads)."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.manager_lab import GiB, Lab, register_servers, start_manager
from tests.procs import SHADOWBLK, Processes

TOKEN = {"Authorization": "Bearer test-token-0123456789"}


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One raw request (bytes are sent as they are, anything else as JSON)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.load(reply), dict(reply.headers)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read()), dict(err.headers)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One manager for the requests that change nothing or only their own volume."""
    workdir = tmp_path_factory.mktemp("manager")
    group = Processes(workdir)
    try:
        lab = start_manager(group, f"sqlite:{workdir / 'meta.db'}", workdir)
        register_servers(lab)
        yield lab
    finally:
        group.stop_all()


VOLUME = {"name": "v1", "size_bytes": GiB}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({**VOLUME, "size_bytes": "ten"}, 422, "body.size_bytes: 'ten' is not of type 'integer'"),
        ({**VOLUME, "size_bytes": 0}, 422, "body.size_bytes: 0 is less than the minimum of 1"),
        (
            {**VOLUME, "size_bytes": 2**70},
            422,
            "is greater than the maximum of 9223372036854710272",
        ),
        ({**VOLUME, "size_bytes": 2**63 - 1}, 422, "greater than the maximum"),
        ({**VOLUME, "size_bytes": True}, 422, "body.size_bytes: True is not of type 'integer'"),
        ({**VOLUME, "mode": "fast"}, 422, "body.mode: 'fast' is not one of ['async', 'sync']"),
        ({**VOLUME, "shadows": 9}, 422, "body.shadows: 9 is greater than the maximum of 8"),
        ({**VOLUME, "name": "../etc"}, 422, "body.name: '../etc' does not match"),
        ({**VOLUME, "colour": "red"}, 422, "('colour' was unexpected)"),
        ({"size_bytes": GiB}, 422, "body: 'name' is a required property"),
        ([VOLUME], 422, "body: [{"),
        (b"{not json", 400, "the request body is not JSON"),
        (b'{"name": "v1", "size_bytes": NaN}', 400, "NaN is not a number JSON allows"),
        (b"[" * 50_000, 400, "the request body is not JSON"),
        (b'{"name": "v\\udc80", "size_bytes": 1}', 400, "not Unicode text: a lone surrogate"),
        (b" " * (65 * 1024), 413, "Request Entity Too Large"),
        ({**VOLUME, "size_bytes": 2**62}, 409, "no server can hold the primary of v1"),
    ],
)
def test_bad_volume_requests_get_a_clear_4xx(lab: Lab, body, status: int, message: str) -> None:
    got, doc, _ = http("POST", f"{lab.url}/v1/volumes", body, TOKEN)
    assert (got, message in doc["error"]) == (status, True), doc
    assert http("GET", f"{lab.url}/v1/volumes/v1")[0] == 404


def test_names_tokens_and_unknowns(lab: Lab) -> None:
    for headers, why in [
        ({}, "needs 'Authorization: Bearer TOKEN'"),
        ({"Authorization": "Basic dXNlcg=="}, "must be 'Bearer TOKEN'"),
        ({"Authorization": "Bearer wrong"}, "wrong bearer token"),
    ]:
        status, doc, reply_headers = http("POST", f"{lab.url}/v1/volumes", VOLUME, headers)
        assert (status, why in doc["error"]) == (401, True)
        assert reply_headers["WWW-Authenticate"] == "Bearer"
    assert http("DELETE", f"{lab.url}/v1/volumes/v1")[0] == 401

    assert http("GET", f"{lab.url}/v1/volumes/nope")[:2] == (
        404,
        {"error": "no volume 'nope'", "detail": None},
    )
    assert http("DELETE", f"{lab.url}/v1/volumes/nope", headers=TOKEN)[0] == 404
    assert http("GET", f"{lab.url}/v1/volumes/nope/placement")[0] == 404
    status, doc, _ = http("GET", f"{lab.url}/v1/servers/bad%20name")
    assert status == 422 and doc["error"].startswith("name: 'bad name' does not match")
    status, doc, _ = http("POST", f"{lab.url}/v1/servers/s9/heartbeat", {"used_bytes": 0}, TOKEN)
    assert status == 404 and "registers before its heartbeats" in doc["error"]
    status, doc, _ = http("GET", f"{lab.url}/v1/events?since=-1")
    assert (
        status == 422
        and doc["error"] == "since: must be an integer from 0 to 9223372036854775807, not '-1'"
    )
    status, doc, headers = http("PUT", f"{lab.url}/v1/volumes", VOLUME, TOKEN)
    assert status == 405 and "POST" in headers["Allow"]

    taken = {**VOLUME, "name": "taken"}
    assert http("POST", f"{lab.url}/v1/volumes", taken, TOKEN)[0] == 201
    status, doc, _ = http("POST", f"{lab.url}/v1/volumes", taken, TOKEN)
    assert status == 409 and doc["error"] == "volume 'taken' exists already"
    # sizes are rounded up to the block size
    odd = {"name": "odd", "size_bytes": 4097, "block_size": 512, "shadows": 0}
    assert http("POST", f"{lab.url}/v1/volumes", odd, TOKEN)[1]["volume"]["size_bytes"] == 4608


def test_silent_servers_go_down_and_come_back(procs: Processes, tmp_path: Path) -> None:
    lab = start_manager(procs, f"sqlite:{tmp_path / 'meta.db'}", tmp_path, "manager",
                        "--heartbeat-timeout", "1")  # fmt: skip
    register_servers(lab)
    client = lab.client()
    deadline = time.monotonic() + 10
    while client.status()["servers"]["down"] < 3:
        assert time.monotonic() < deadline, "no server marked down within 10 s"
        time.sleep(0.2)
    assert client.status()["volumes"]["total"] == 0
    assert (
        client.heartbeat("s1", used_bytes=GiB, latency_ms={"p99": 3.5})["server"]["state"] == "up"
    )
    s1 = client.server("s1")
    assert s1["used_bytes"] == GiB and s1["health"]["latency_ms"] == {"p99": 3.5}
    # the manager adds its own failure estimate to what the agent sent
    assert set(s1["health"]) == {"latency_ms", "failure"}
    assert 0 <= s1["health"]["failure"]["probability"] <= 1
    kinds = [(e["kind"], e["subject"]) for e in client.events()]
    assert ("server-down", "s1") in kinds
    first_down = kinds.index(("server-down", "s1"))
    assert ("server-up", "s1") in kinds[first_down:]  # (it may time out again after this beat)


def test_standby_names_the_leader_and_takes_over(procs: Processes, tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'meta.db'}"
    leader = start_manager(procs, store, tmp_path, "leader")
    standby = start_manager(procs, store, tmp_path, "standby")
    assert standby.client().status()["manager"] == {"url": standby.url, "leading": False}

    status, doc, _ = http("POST", f"{standby.url}/v1/volumes", VOLUME, TOKEN)
    assert status == 503 and doc["detail"] == {"leader": leader.url}
    # the client follows the standby's answer to the leader
    register_servers(standby)
    assert standby.client().create_volume(**VOLUME)["volume"]["primary"] == "s2"
    assert [v["name"] for v in standby.client().volumes()] == ["v1"]

    assert procs.stop(leader.process, signal.SIGTERM) == 0
    deadline = time.monotonic() + 10
    while not standby.client().status()["manager"]["leading"]:
        assert time.monotonic() < deadline, "the standby did not lead within 10 s"
        time.sleep(0.2)
    assert standby.client().delete_volume("v1")["name"] == "v1"


def test_without_a_token_file_a_token_is_generated(procs: Processes, tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = procs.start(
        [*SHADOWBLK, "manager", "--store", f"sqlite:{tmp_path / 'meta.db'}", "--listen",
         "127.0.0.1:0", "--state-dir", str(state)],
        name="manager",
    )  # fmt: skip
    url = procs.wait_ready(proc).removeprefix("ready ")
    token = (state / "token").read_text().strip()
    assert f"bearer token in {state / 'token'}" in (tmp_path / "manager.log").read_text()
    server = {"name": "s1", "zone": "a", "rack": "r", "capacity_bytes": GiB}
    assert http("POST", f"{url}/v1/servers", server, TOKEN)[0] == 401
    assert http("POST", f"{url}/v1/servers", server, {"Authorization": f"Bearer {token}"})[0] == 200
    assert procs.stop(proc) == 0
