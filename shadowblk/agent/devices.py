"""Lost primary devices: when the block device of a primary volume this agent hosts disappears,
the manager is asked for an emergency switchover of that volume at once
(POST /v1/volumes/NAME/emergency), without waiting for any heartbeat to time out.

Two sources report devices, whichever comes first: the agent's pyudev watcher (udev_watch.py)
and the udev rule's RUN, which hands a removed device to the agent's control endpoint
(`shadowblk notify-device`, POST /v1/devices). A volume is reported once per loss (a new "add"
of its device re-arms it). The reports run on their own thread, so neither udev nor the agent's
loop waits for the switchover. A report is retried every RETRY_S while no manager (or no
leader) answers; one the manager refused, or whose switchover failed, is retried with a
backoff doubling up to MAX_RETRY_S, one volume not holding up another, until a switchover
succeeds, the manager names another primary, or the device comes back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from shadowblk.agent.udev_watch import DeviceEvent
from shadowblk.manager.client import Client, ManagerError

log = logging.getLogger(__name__)

RETRY_S = 1.0
MAX_RETRY_S = 30.0
EMERGENCY_TIMEOUT_S = 120.0  # the manager answers once the switchover is done (or failed)


class DeviceWatch:
    """Turns device events into emergency switchover requests for SERVER's primaries (the
    volumes PRIMARIES() names at the moment of the event)."""

    def __init__(self, client: Client, server: str, primaries: Callable[[], Iterable[str]]):
        self.client, self.server, self.primaries = client, server, primaries
        self.lost: set[str] = set()  # volumes reported (or being reported) since their loss
        self.records: list[dict[str, Any]] = []  # the manager's answers, newest last
        self.refused: dict[str, str] = {}  # volume -> why the manager would not switch it over
        self._lock = threading.Lock()
        self._reports: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-lost", daemon=True)
        self._thread.start()

    def event(self, event: DeviceEvent) -> bool:
        """Act on EVENT; True when it started an emergency report (False: not a loss of a
        primary here, or one already reported)."""
        volume = event.volume
        if event.action == "add":
            with self._lock:
                self.lost.discard(volume)
            return False
        if event.action != "remove" or volume not in set(self.primaries()):
            return False
        with self._lock:
            if volume in self.lost:
                return False
            self.lost.add(volume)
        reason = f"{self.server}: the primary's device {event.devnode or event.name} is gone"
        log.error("%s: emergency switchover requested", reason)
        self._reports.put((volume, reason))
        return True

    def _run(self) -> None:
        pending: dict[str, tuple[str, float, float]] = {}  # volume -> (reason, due, backoff)
        while True:
            due = min((when for _, when, _ in pending.values()), default=None)
            try:
                wait = None if due is None else max(due - time.monotonic(), 0.0)
                item = self._reports.get(timeout=wait)
            except queue.Empty:
                item = ()
            if item is None or self._stopping.is_set():
                return
            if item:
                pending[item[0]] = (item[1], time.monotonic(), RETRY_S)
            for volume, (reason, when, backoff) in list(pending.items()):
                if when > time.monotonic():
                    continue
                try:
                    outcome = self._report(volume, reason)
                except Exception:  # a bug must not end the reports of every later loss
                    log.exception("emergency switchover of %s: the report failed", volume)
                    outcome = "failed"
                if outcome == "done":
                    del pending[volume]
                    continue
                delay = RETRY_S if outcome == "unreachable" else backoff
                log.warning("emergency switchover of %s: retrying in %.1f s", volume, delay)
                pending[volume] = (reason, time.monotonic() + delay, min(backoff * 2, MAX_RETRY_S))

    def _report(self, volume: str, reason: str) -> str:
        """One report of VOLUME's loss: done (switched over, moved already, or the device is
        back), unreachable (no manager or no leader: try again soon) or failed (back off)."""
        with self._lock:
            if volume not in self.lost:
                return "done"  # the device came back
        body = {"server": self.server, "reason": reason}
        try:
            record = self.client.call("POST", f"/v1/volumes/{volume}/emergency", body)
        except ManagerError as err:
            if err.status == 0 or err.status >= 500:  # no manager, or no leader yet
                log.warning("emergency switchover of %s: %s", volume, err)
                return "unreachable"
            log.error("emergency switchover of %s refused: %s", volume, err)
            self.refused[volume] = str(err)
            return "done" if err.status == 409 and self._moved(volume) else "failed"
        self.records.append(record)
        if record.get("outcome") == "succeeded":
            log.warning("emergency switchover of %s: succeeded", volume)
            self.refused.pop(volume, None)
            return "done"
        log.error("emergency switchover of %s failed: %s", volume, record.get("error"))
        return "failed"

    def _moved(self, volume: str) -> bool:
        """The manager names another primary of VOLUME (or has none): nothing to report."""
        try:
            return self.client.volume(volume).get("primary") != self.server
        except ManagerError as err:
            return err.status == 404

    def stop(self) -> None:
        self._stopping.set()
        self._reports.put(None)
        self._thread.join(5)
