"""DeviceWatch (which device events make an emergency report, and only once per loss) and the
run file through which `shadowblk notify-device` finds the agent. The manager side of the
report is tested with real processes in tests/integration/test_agent_device_lost.py."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shadowblk.agent import devices, notify
from shadowblk.agent.devices import DeviceWatch
from shadowblk.agent.udev_watch import DeviceEvent
from shadowblk.manager.client import Client
from shadowblk.ports import free_port


def event(action: str, name: str = "sbk-v1") -> DeviceEvent:
    return DeviceEvent(action, name, "/dev/dm-3", "/sys/devices/virtual/block/dm-3")


@pytest.fixture
def watch() -> Iterator[DeviceWatch]:
    """Reports to a manager that does not listen: they are retried until stop()."""
    devices = DeviceWatch(Client(f"http://127.0.0.1:{free_port()}"), "s1", lambda: ["v1"])
    yield devices
    start = time.monotonic()
    devices.stop()
    assert time.monotonic() - start < 5  # a report being retried does not hold the agent


def test_only_the_removal_of_a_local_primary_is_a_loss(watch: DeviceWatch) -> None:
    assert not watch.event(event("add"))
    assert not watch.event(event("change"))
    assert not watch.event(event("remove", "sbk-v2"))  # not a primary here
    assert watch.lost == set()
    assert watch.event(event("remove"))
    assert watch.lost == {"v1"}


def test_a_loss_is_reported_once_until_the_device_is_back(watch: DeviceWatch) -> None:
    assert watch.event(event("remove"))
    assert not watch.event(event("remove"))  # the watcher and the rule's RUN both report it
    assert not watch.event(event("change"))
    assert not watch.event(event("add"))  # back: a new loss is a new report
    assert watch.event(event("remove"))


def test_the_run_file_is_private_and_removed_by_its_writer_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    notify.publish(run, "127.0.0.1:7000", "t0k3n")
    path = run / notify.RUN_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == {
        "control": "127.0.0.1:7000", "token": "t0k3n", "pid": os.getpid()
    }  # fmt: skip
    path.write_text(json.dumps({"control": "x", "token": "y", "pid": 1}))  # another agent's
    notify.unpublish(run)
    assert path.exists()
    notify.publish(run, "127.0.0.1:7000", "t0k3n")
    notify.unpublish(run)
    assert not path.exists()


def test_notify_says_why_it_cannot_reach_the_agent(tmp_path: Path) -> None:
    with pytest.raises(notify.NotifyError, match="no agent to notify"):
        notify.notify(tmp_path, "remove", "sbk-v1", None)
    notify.publish(tmp_path, f"127.0.0.1:{free_port()}", "t")  # nobody listens there
    with pytest.raises(notify.NotifyError, match="did not answer"):
        notify.notify(tmp_path, "remove", "sbk-v1", None)


class Scripted(ThreadingHTTPServer):
    """A manager on loopback that answers the emergency calls from a script (status, body),
    the last answer repeated, and says v1's primary is PRIMARY."""

    def __init__(self, script: list[tuple[int, bytes]], primary: str = "s1") -> None:
        self.script, self.primary, self.calls = script, primary, []
        super().__init__(("127.0.0.1", 0), Answer)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class Answer(BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, json.dumps({"name": "v1", "primary": self.server.primary}).encode())

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.server.calls.append((self.path, json.loads(self.rfile.read(length))))
        script = self.server.script
        self._send(*(script.pop(0) if len(script) > 1 else script[0]))


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "RETRY_S", 0.05)
    monkeypatch.setattr(devices, "MAX_RETRY_S", 0.2)


def reporting(manager: Scripted, volumes: list[str]) -> DeviceWatch:
    return DeviceWatch(Client(manager.url, "t"), "s1", lambda: volumes)


def test_a_failed_or_refused_report_is_retried_until_a_switchover_succeeds(quick: None) -> None:
    failed = json.dumps({"volume": "v1", "outcome": "failed", "error": "promote"}).encode()
    succeeded = json.dumps({"volume": "v1", "outcome": "succeeded"}).encode()
    no_shadow = json.dumps({"error": "v1 has no shadow that can be promoted now"}).encode()
    manager = Scripted([(200, failed), (409, no_shadow), (200, b"[]"), (200, succeeded)])
    watch = reporting(manager, ["v1"])
    try:
        assert watch.event(event("remove"))
        wait = time.monotonic() + 30
        while not (watch.records and watch.records[-1] == json.loads(succeeded)):
            assert time.monotonic() < wait, (manager.calls, watch.records)
            time.sleep(0.02)
        # the failed outcome, the 409 and the answer that is no record (which raised in the
        # report thread) were each followed by another report; the success ended them
        assert len(manager.calls) == 4
        assert manager.calls[0] == (
            "/v1/volumes/v1/emergency",
            {"server": "s1", "reason": manager.calls[0][1]["reason"]},
        )
        assert "v1" not in watch.refused
        time.sleep(0.5)
        assert len(manager.calls) == 4
    finally:
        watch.stop()
        manager.shutdown()
        manager.server_close()


def test_a_refusal_because_another_server_is_primary_ends_the_reports(quick: None) -> None:
    moved = json.dumps({"error": "v1: its primary is s2, not s1: nothing to take over"}).encode()
    manager = Scripted([(409, moved)], primary="s2")
    watch = reporting(manager, ["v1"])
    try:
        assert watch.event(event("remove"))
        wait = time.monotonic() + 30
        while "v1" not in watch.refused:
            assert time.monotonic() < wait
            time.sleep(0.02)
        time.sleep(0.5)
        assert len(manager.calls) == 1
    finally:
        watch.stop()
        manager.shutdown()
        manager.server_close()


def test_a_loss_still_being_retried_does_not_hold_up_another(quick: None) -> None:
    """v1's reports keep failing; v2's loss is reported meanwhile, and the device of v1 coming
    back ends its reports."""
    failed = json.dumps({"volume": "v1", "outcome": "failed", "error": "x"}).encode()
    manager = Scripted([(200, failed)])
    watch = reporting(manager, ["v1", "v2"])
    try:
        assert watch.event(event("remove"))
        assert watch.event(event("remove", "sbk-v2"))
        wait = time.monotonic() + 30
        while not any(path.endswith("/v2/emergency") for path, _ in manager.calls):
            assert time.monotonic() < wait
            time.sleep(0.02)
        assert not watch.event(event("add"))  # v1's device is back
        time.sleep(0.3)
        v1_reports = sum(path.endswith("/v1/emergency") for path, _ in manager.calls)
        time.sleep(0.6)  # retries come every 0.2 s: three or more had they gone on
        later = sum(path.endswith("/v1/emergency") for path, _ in manager.calls)
        assert later <= v1_reports + 1  # at most the one already in flight at the "add"
    finally:
        watch.stop()
        manager.shutdown()
        manager.server_close()
