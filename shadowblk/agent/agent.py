"""The agent's loop: register, heartbeat with health, act on the orders each heartbeat returns,
and keep the children serving.

One thread: the children are supervised every TICK_S, a heartbeat goes every --interval. A
manager that does not answer is retried at the next heartbeat; the volumes keep being served
meanwhile (whether a cut-off primary may still accept writes is the switchover's fencing).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shadowblk.agent import health, notify
from shadowblk.agent.control import serve_control
from shadowblk.agent.devices import EMERGENCY_TIMEOUT_S, DeviceWatch
from shadowblk.agent.discrepancy_feed import DiscrepancyFeed
from shadowblk.agent.exporter import serve_metrics
from shadowblk.agent.hosting import Endpoint, Hosting, Replication
from shadowblk.agent.metrics import AgentMetrics
from shadowblk.agent.smart_source import LiveSmart, ReplaySmart
from shadowblk.agent.udev_watch import UdevWatcher
from shadowblk.manager.client import Client, ManagerError

log = logging.getLogger(__name__)

TICK_S = 0.2
SHADOW_READY_S = 30.0


@dataclass
class Config:
    manager: str
    token: str | None
    name: str
    zone: str
    rack: str
    data_dir: Path
    listen: Endpoint
    nbd_listen: Endpoint
    capacity: int | None
    interval: float
    hmac_key_file: Path
    serve_has_shadows: bool
    metrics_listen: Endpoint | None
    smart_replay: ReplaySmart | None = None  # instead of smartctl (--smart-replay)
    control_listen: Endpoint | None = None  # default: --listen's host, any free port
    watch_udev: bool = False  # a lost primary device asks for an emergency switchover at once
    run_dir: Path | None = None  # agent.json for `shadowblk notify-device` (udev's RUN)


def allocated_bytes(root: Path) -> int:
    """Bytes the files under ROOT take on disk (sparse volume files count what is written)."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(FileNotFoundError):  # dropped meanwhile
                total += os.lstat(os.path.join(folder, f)).st_blocks * 512
    return total


class Agent:
    """One storage server's agent."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.client = Client(config.manager, config.token, timeout_s=max(1.0, config.interval * 2))
        self.stopping = threading.Event()
        self.metrics = AgentMetrics()
        self.probe = health.LatencyProbe(config.data_dir, self.metrics)
        self.smart: dict[str, Any] = {}
        self.smart_source = config.smart_replay or LiveSmart(config.data_dir)
        self.hosting = Hosting(
            config.data_dir,
            config.listen,
            config.nbd_listen,
            Replication(config.serve_has_shadows, config.hmac_key_file, self.shadow_address),
        )
        self.volume_probe = health.VolumeProbe(
            self.metrics, lambda: health.serving(self.hosting.children), config.interval
        )
        self.volume_probe.start()
        self.discrepancies = DiscrepancyFeed(self.hosting.primaries_dir, self.metrics)
        self.registered = self._announced = False
        self._last_error = ""
        self.devices = DeviceWatch(
            Client(config.manager, config.token, timeout_s=EMERGENCY_TIMEOUT_S),
            config.name,
            self.primaries,
        )
        listen = config.control_listen or Endpoint(config.listen.host, 0)
        local_token = secrets.token_hex(16)
        self.control = serve_control(
            listen, self.hosting, config.token, self.devices.event, local_token
        )
        self.control_address = listen.with_port(self.control.server_port)
        self.watcher = self._watch_udev() if config.watch_udev else None
        if config.run_dir is not None:
            try:
                notify.publish(config.run_dir, self.control_address, local_token)
            except OSError as err:  # the watcher still reports; udev's RUN cannot
                log.warning("cannot write %s: %s", config.run_dir / notify.RUN_FILE, err)

    def _watch_udev(self) -> UdevWatcher | None:
        """The pyudev watcher feeding DeviceWatch; None (said) if udev cannot be listened to."""
        watcher = UdevWatcher(self.devices.event)
        try:
            watcher.start()
        except OSError as err:
            log.warning("not watching udev: %s", err)
            return None
        log.info("watching udev for devices tagged shadowblk")
        return watcher

    def primaries(self) -> list[str]:
        """The volumes this agent hosts as primary now."""
        with self.hosting.lock:
            return [n for n, rec in self.hosting.volumes.items() if rec["role"] == "primary"]

    def shadow_address(self, server: str) -> str:
        """Where SERVER's shadow server listens, from the manager (LookupError: not known now)."""
        try:
            address = self.client.server(server).get("address", "")
        except ManagerError as err:
            raise LookupError(f"the address of {server}: {err}") from None
        if not address:
            raise LookupError(f"{server} registered no shadow address")
        return address

    def run(self) -> None:
        """Serve until stop(): children first, then registration and heartbeats."""
        next_beat = 0.0
        if self.config.metrics_listen is not None:
            log.info("metrics at %s", serve_metrics(self.config.metrics_listen, self.metrics))
        try:
            self._start_shadow_server()
            while not self.stopping.is_set():
                now = time.monotonic()
                self.hosting.tick(now)
                if now >= next_beat:
                    next_beat = now + self.config.interval
                    self.beat(now)
                self.hosting.wake.wait(TICK_S)  # or at once when the control endpoint asks
                self.hosting.wake.clear()
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            if self.config.run_dir is not None:
                notify.unpublish(self.config.run_dir)
            self.devices.stop()
            self.control.shutdown()
            self.hosting.stop()
            self.hosting.save()

    def _start_shadow_server(self) -> None:
        """The shadow server's address is registered: it must listen before the agent registers."""
        child, deadline = self.hosting.shadow_child, time.monotonic() + SHADOW_READY_S
        while child.url is None and not self.stopping.is_set():
            if child.restarts or time.monotonic() > deadline:
                reason = child.last_error or "no ready line"
                raise RuntimeError(f"the shadow server did not start: {reason}")
            child.tick(time.monotonic())
            time.sleep(0.05)
        self.hosting.note_shadow_ports()

    def stop(self) -> None:
        self.stopping.set()
        self.hosting.wake.set()

    def beat(self, now: float) -> None:
        """Register if needed, send one heartbeat, act on its orders; log a failure once."""
        self.smart = self.smart_source.poll(now)
        try:
            if not self.registered:
                self.client.register(**self.registration())
                log.info("registered %s with %s", self.config.name, self.config.manager)
                if not self._announced:
                    print(f"ready agent {self.config.name} {self.config.manager}", flush=True)
                self.registered = self._announced = True
            self.probe.probe()
            sent = time.monotonic()  # a lease counts from before the manager saw the heartbeat
            reply = self.client.heartbeat(self.config.name, **self.health())
        except ManagerError as err:
            if err.status == 404:
                self.registered = False  # a new store forgot us: register again
            if str(err) != self._last_error:
                log.warning("heartbeat: %s", err)
                self._last_error = str(err)
            return
        if self._last_error:
            log.warning("heartbeat: the manager answers again")
            self._last_error = ""
        for order in sorted(reply["orders"], key=lambda o: o["seq"]):
            try:
                self.hosting.apply(order)
            except (OSError, LookupError) as err:  # try this order again at the next heartbeat
                log.error("order %s: %s", order.get("order_id"), err)
                return
        self.hosting.renew(reply.get("leases", {}), sent + reply.get("lease_s", 0.0))

    def _space(self) -> tuple[int, int]:
        capacity, used = health.space(self.config.data_dir)
        if self.config.capacity is not None:
            return self.config.capacity, allocated_bytes(self.config.data_dir)
        return capacity, used

    def registration(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": c.name,
            "zone": c.zone,
            "rack": c.rack,
            "address": c.listen.with_port(self.hosting.shadow_port),
            "control_address": self.control_address,
            "verify_address": c.listen.with_port(self.hosting.verify_port),
            "nbd_address": c.nbd_listen.with_port(c.nbd_listen.port),
            "capacity_bytes": self._space()[0],
            "drive_models": health.drive_models(self.smart),
        }

    def health(self) -> dict[str, Any]:
        self.discrepancies.poll()
        return {
            "used_bytes": self._space()[1],
            "io_window": self.volume_probe.window(),
            **self.metrics.health(),
            "smart": self.smart,
            "hosted": self.hosting.report(),
            "orders_since": self.hosting.orders_since,
        }
