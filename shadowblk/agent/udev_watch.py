"""Block devices tagged for shadowblk, as udev reports them: add, change, remove.

udev/90-shadowblk.rules tags a device-mapper device or GPT partition named sbk-NAME with the
udev tag "shadowblk" and SHADOWBLK_NAME=sbk-NAME. The watcher listens for that tag (pyudev, the
udev netlink monitor: events arrive after the rules ran) and reports each event; at start it
reports the tagged devices already present as "add". The agent starts it (`shadowblk agent
--watch-udev`, the default where udev runs) and hands each event to devices.DeviceWatch, which
asks the manager for an emergency switchover when a local primary's device goes away.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def udev_running() -> bool:
    """Whether this host runs udev (its control socket exists): the watcher has events."""
    return Path("/run/udev/control").exists()


class UdevWatcher:
    """Reports tagged devices to ON_EVENT (from pyudev's thread)."""

    def __init__(self, on_event: Callable[[DeviceEvent], object]) -> None:
        self.on_event = on_event
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

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
