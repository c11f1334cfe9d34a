"""DeviceWatch (which device events make an emergency report, and only once per loss) and the
run file through which `shadowblk notify-device` finds the agent. The manager side of the
report is tested with real processes in tests/integration/test_agent_device_lost.py."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowblk.agent import notify
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
