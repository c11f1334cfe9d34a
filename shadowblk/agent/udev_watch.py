"""Block devices tagged for shadowblk, as udev reports them: add, change, remove.

udev/90-shadowblk.rules tags a device-mapper device or GPT partition named sbk-NAME with the
udev tag "shadowblk" and SHADOWBLK_NAME=sbk-NAME. The watcher listens for that tag (pyudev, the
udev netlink monitor: events arrive after the rules ran) and reports each event; at start it
reports the tagged devices already present as "add". When the device of a local primary volume
goes away, the primary is lost: ON_PRIMARY_LOST(volume) is called at once, the hook for an
emergency switchover. The manager has no call for that yet (its client's `POST
/v1/volumes/NAME/switchover` is the planned switchover, which fences and drains the old primary;
emergencies start inside the manager on a missed heartbeat), so the agent passes its own
callable; the watcher is not started by the agent yet either (see docs/kernel-lab.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyudev

log = logging.getLogger(__name__)

TAG = "shadowblk"
PREFIX = "sbk-"


@dataclass(frozen=True)
class DeviceEvent:
    action: str  # add, change or remove
    name: str  # SHADOWBLK_NAME: sbk-VOLUME
    devnode: str | None
    sys_path: str

    @property
    def volume(self) -> str:
        return self.name.removeprefix(PREFIX)

    @classmethod
    def of(cls, device: pyudev.Device, action: str | None = None) -> DeviceEvent | None:
        """The event for DEVICE, or None when the rules did not tag it."""
        name = device.properties.get("SHADOWBLK_NAME")
        if not name:
            return None
        return cls(action or device.action or "add", name, device.device_node, device.sys_path)


class UdevWatcher:
    """Reports tagged devices to ON_EVENT; a removed device of a volume in PRIMARIES() (the
    local primary volumes, asked at the moment of the event) calls ON_PRIMARY_LOST(volume)."""

    def __init__(
        self,
        on_event: Callable[[DeviceEvent], None],
        primaries: Callable[[], Iterable[str]] = frozenset,
        on_primary_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.on_event = on_event
        self.primaries = primaries
        self.on_primary_lost = on_primary_lost
        self.context = pyudev.Context()
        self.observer: pyudev.MonitorObserver | None = None

    def present(self) -> list[DeviceEvent]:
        """The tagged devices there now, as "add" events."""
        found = self.context.list_devices(subsystem="block").match_tag(TAG)
        return [e for e in (DeviceEvent.of(d, "add") for d in found) if e is not None]

    def start(self) -> None:
        """Listen first, then report what is present, so that nothing falls in between."""
        monitor = pyudev.Monitor.from_netlink(self.context)
        monitor.filter_by("block")
        monitor.filter_by_tag(TAG)
        self.observer = pyudev.MonitorObserver(monitor, callback=self._device, name="udev-watch")
        self.observer.start()
        for event in self.present():
            self._report(event)

    def _device(self, device: pyudev.Device) -> None:
        event = DeviceEvent.of(device)
        if event is not None:
            self._report(event)

    def _report(self, event: DeviceEvent) -> None:
        log.info("udev: %s %s (%s)", event.action, event.name, event.devnode)
        self.on_event(event)
        if (
            event.action == "remove"
            and self.on_primary_lost is not None
            and event.volume in set(self.primaries())
        ):
            log.error("primary device of %s is gone: emergency switchover", event.volume)
            self.on_primary_lost(event.volume)

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
