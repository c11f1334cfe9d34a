"""Alerts end to end: a real manager, a real webhook receiver (an HTTP server in the test), and a
shadow's server that stops heartbeating (until agents exist, that is how a shadow is killed):
the receiver gets `ServerDown` and `ShadowOutOfSync` firing, once each, in Alertmanager's
webhook format, then both resolved when the heartbeats resume. The manager's /metrics parses
with Prometheus's text parser and carries the fleet's families."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shadowblk.agent.metrics import AgentMetrics
from tests.manager_lab import BEAT_ON_DEMAND, GiB, Lab, register_servers, start_manager
from tests.procs import SHADOWBLK, Processes


class Receiver:
    """An HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        received = self.messages

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, status: str) -> list[dict[str, Any]]:
        return [a for m in self.messages for a in m["alerts"] if a["status"] == status]

    def wait(self, status: str, names: set[str], timeout: float = 15) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [a for a in self.alerts(status) if a["labels"]["alertname"] in names]
            if {a["labels"]["alertname"] for a in found} == names:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no {status} {names} within {timeout} s: {self.messages}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


class Agents:
    """Heartbeats for every lab server every 0.3 s, from a thread; `silent` ones skip theirs."""

    def __init__(self, lab: Lab, shadow: str) -> None:
        self.lab, self.shadow, self.silent = lab, shadow, set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client = self.lab.client()
        agent = AgentMetrics()
        agent.set_shadow("v1", self.shadow, "in_sync", 0.2, 4096)
        while not self.stop.wait(0.3):
            for name in {"s1", "s2", "s3"} - self.silent:
                health = agent.health() if name == "s1" else {}
                client.heartbeat(name, used_bytes=0, **health)


def metrics(lab: Lab) -> dict[str, Any]:
    with urllib.request.urlopen(f"{lab.url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(family: Any, **labels: str) -> float:
    return next(s.value for s in family.samples if labels.items() <= s.labels.items())


def test_killed_shadow_fires_then_resolves(
    procs: Processes, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "alerts.yaml"
    config.write_text(f"webhooks: [{receiver.url}]\nevaluate_every_s: 0.5\n")
    monkeypatch.setenv("SHADOWBLK_ALERTS_CONFIG", str(config))
    lab = start_manager(
        procs, f"sqlite:{tmp_path / 'meta.db'}", tmp_path, "manager", "--heartbeat-timeout", "1"
    )
    register_servers(lab)
    created = lab.client().create_volume(name="v1", size_bytes=GiB, primary="s1", shadows=1)
    shadow = created["volume"]["shadows"][0]["server"]
    agents = Agents(lab, shadow)
    try:
        time.sleep(2)  # a steady fleet raises nothing
        assert receiver.messages == []

        agents.silent.add(shadow)  # the shadow's server dies
        firing = receiver.wait("firing", {"ServerDown", "ShadowOutOfSync"})
        by_name = {a["labels"]["alertname"]: a for a in firing}
        assert by_name["ServerDown"]["labels"] == {
            "alertname": "ServerDown", "severity": "critical", "server": shadow,
        }  # fmt: skip
        assert by_name["ShadowOutOfSync"]["labels"] == {
            "alertname": "ShadowOutOfSync", "severity": "warning", "volume": "v1",
            "shadow": shadow,
        }  # fmt: skip
        summary = by_name["ShadowOutOfSync"]["annotations"]["summary"]
        assert summary == f"shadow of v1 on {shadow} is out of sync: its server {shadow} is down"
        message = receiver.messages[0]
        assert message["version"] == "4" and message["status"] == "firing"
        assert message["receiver"] and message["groupKey"] and message["externalURL"] == lab.url
        for a in firing:
            assert a["endsAt"] == "0001-01-01T00:00:00Z" and a["startsAt"].endswith("Z")
            assert a["generatorURL"] == f"{lab.url}/dashboard/" and a["fingerprint"]

        seen = metrics(lab)
        assert value(seen["shadowblk_server_up"], server=shadow) == 0
        assert value(seen["shadowblk_alerts_firing"], alertname="ServerDown") == 1

        time.sleep(1.5)  # still down: still one notification each (deduplicated)
        assert len(receiver.alerts("firing")) == 2

        agents.silent.clear()  # it comes back
        resolved = receiver.wait("resolved", {"ServerDown", "ShadowOutOfSync"})
        for a in resolved:
            match = by_name[a["labels"]["alertname"]]
            assert a["fingerprint"] == match["fingerprint"] and a["startsAt"] == match["startsAt"]
            assert a["endsAt"] > a["startsAt"]
        summaries = {a["labels"]["alertname"]: a["annotations"]["summary"] for a in resolved}
        assert summaries == {
            "ServerDown": f"server {shadow} is up again",
            "ShadowOutOfSync": f"shadow of v1 on {shadow} is back in service",
        }
        assert len(receiver.alerts("firing")) == 2 and len(receiver.alerts("resolved")) == 2
    finally:
        agents.stop.set()
        agents.thread.join()
    log = (tmp_path / "manager.log").read_text()
    assert "alert firing [critical] ServerDown" in log and "alert resolved ServerDown" in log


def test_manager_metrics_carry_the_fleet(procs: Processes, tmp_path: Path) -> None:
    lab = start_manager(procs, f"sqlite:{tmp_path / 'meta.db'}", tmp_path, *BEAT_ON_DEMAND)
    register_servers(lab)
    client = lab.client()
    created = client.create_volume(name="v1", size_bytes=GiB, primary="s1", shadows=1)
    shadow = created["volume"]["shadows"][0]["server"]
    agent = AgentMetrics()
    agent.record_write("v1", 1 << 20)
    agent.set_volume("v1", dirty_bytes=65536, epoch=7)
    agent.set_shadow("v1", shadow, "in_sync", 0.75, 65536)
    agent.observe_io("write", 0.003)
    agent.add_discrepancies("v1", 2)
    agent.set_failure(0.4, ["latency spikes"])
    client.heartbeat("s1", used_bytes=0, **agent.health())
    result = {"from": "s1", "to": shadow, "outcome": "failed", "pause_seconds": 0.02}
    client.call("POST", "/v1/volumes/v1/switchover-results", result)
    deadline = time.monotonic() + 10
    while "shadowblk_switchovers" not in (seen := metrics(lab)) or not value(
        seen["shadowblk_switchovers"], outcome="failed"
    ):
        assert time.monotonic() < deadline, sorted(seen)
        time.sleep(0.2)
    assert value(seen["shadowblk_volume_written_bytes"], volume="v1", server="s1") == 1 << 20
    assert value(seen["shadowblk_volume_dirty_bytes"], volume="v1") == 65536
    assert value(seen["shadowblk_volume_epoch"], volume="v1") == 7
    assert value(seen["shadowblk_replication_lag_seconds"], volume="v1", shadow=shadow) == 0.75
    assert value(seen["shadowblk_replication_lag_bytes"], volume="v1", shadow=shadow) == 65536
    assert value(seen["shadowblk_shadow_state"], shadow=shadow, state="in_sync") == 1
    assert seen["shadowblk_io_latency_seconds"].type == "histogram"
    assert value(seen["shadowblk_io_latency_seconds"], server="s1", le="0.005") == 1
    assert value(seen["shadowblk_io_errors"], server="s1") == 0
    assert value(seen["shadowblk_checksum_discrepancies"], server="s1") == 2
    assert value(seen["shadowblk_server_failure_probability"], server="s1") == 0.4
    assert value(seen["shadowblk_volume_generation"], volume="v1") == 1
    assert value(seen["shadowblk_switchover_pause_seconds"], le="0.025") == 1
    assert value(seen["shadowblk_alerts_firing"], alertname="SwitchoverFailed") == 1
    assert value(seen["shadowblk_server_up"], server="s1") == 1


def test_a_bad_alerts_config_stops_the_manager_with_a_reason(tmp_path: Path) -> None:
    config = tmp_path / "alerts.yaml"
    config.write_text("webhooks: [ftp://nowhere]\n")
    (tmp_path / "token").write_text("test-token-0123456789\n")
    done = subprocess.run(
        [*SHADOWBLK, "manager", "--store", f"sqlite:{tmp_path / 'meta.db'}", "--listen",
         "127.0.0.1:0", "--token-file", str(tmp_path / "token")],
        env={**os.environ, "SHADOWBLK_ALERTS_CONFIG": str(config)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"Error: {config}: webhooks must be a list of http(s) URLs" in done.stderr
