"""Lost primary devices: when the block device of a primary volume this agent hosts disappears,
the manager is asked for an emergency switchover of that volume at once
(POST /v1/volumes/NAME/emergency), without waiting for any heartbeat to time out.

Two sources report devices, whichever comes first: the agent's pyudev watcher (udev_watch.py)
and the udev rule's RUN, which hands a removed device to the agent's control endpoint
(`shadowblk notify-device`, POST /v1/devices). A volume is reported once per loss (a new "add"
of its device re-arms it). The report runs on its own thread and is retried every RETRY_S
while no manager answers, so neither udev nor the agent's loop waits for the switchover.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from shadowblk.agent.udev_watch import DeviceEvent
from shadowblk.manager.client import Client, ManagerError

log = logging.getLogger(__name__)

RETRY_S = 1.0
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
        while (item := self._reports.get()) is not None:
            self._report(*item)

    def _report(self, volume: str, reason: str) -> None:
        body = {"server": self.server, "reason": reason}
        while not self._stopping.is_set():
            try:
                record = self.client.call("POST", f"/v1/volumes/{volume}/emergency", body)
            except ManagerError as err:
                if err.status in (0, 503) or err.status >= 500:  # no manager, or no leader yet
                    log.warning("emergency switchover of %s: %s: retrying", volume, err)
                    self._stopping.wait(RETRY_S)
                    continue
                log.error("emergency switchover of %s refused: %s", volume, err)
                self.refused[volume] = str(err)
                return
            log.warning("emergency switchover of %s: %s", volume, record.get("outcome"))
            self.records.append(record)
            return

    def stop(self) -> None:
        self._stopping.set()
        self._reports.put(None)
        self._thread.join(5)
