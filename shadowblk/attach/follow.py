"""Follow the manager's volume map: repoint when the volume's primary endpoint or generation moves.

The volume record (GET /v1/volumes/NAME) names the primary server and the generation; the
primary's NBD endpoint is what its agent last reported in its heartbeat (`health.hosted[NAME]`
of GET /v1/servers/PRIMARY, role primary, state running). The manager's client is synchronous:
calls run in a thread so the router's I/O never waits on HTTP. What follows is either the
userspace router (attach/router.py) or the device-mapper attach (attach/kernel.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from shadowblk.attach.router import Refused
from shadowblk.manager.client import Client, ManagerError

log = logging.getLogger(__name__)


def primary_endpoint(client: Client, volume: str) -> tuple[str, int] | None:
    """(nbd:// URI, generation) of VOLUME's primary now; None while no endpoint is known."""
    record = client.volume(volume)
    server = client.server(record["primary"])
    hosted = (server.get("health") or {}).get("hosted") or {}
    entry = hosted.get(volume) or {}
    endpoint = entry.get("endpoint") or ""
    if entry.get("role") != "primary" or entry.get("state") != "running":
        return None
    if not endpoint.startswith("nbd://"):
        return None
    return endpoint, int(record["generation"])


class Target(Protocol):
    """What a follower keeps pointed at the volume's primary."""

    generation: int

    @property
    def upstream_uri(self) -> str | None: ...

    @property
    def upstream_alive(self) -> bool: ...

    async def repoint(self, uri: str, generation: int) -> Any: ...


class Follower:
    """Polls the manager and repoints the router when the primary changes; once told its
    control URL (and given a token), registers it as the volume's attachment so that a
    switchover pushes the repoint instead of waiting for the next poll."""

    def __init__(self, client: Client, volume: str, interval: float = 0.5) -> None:
        self.client, self.volume, self.interval = client, volume, interval
        self.control_url: str | None = None
        self._warned = False
        self.wake = asyncio.Event()  # set: look at the manager now (the upstream died)

    def announce(self, control_url: str) -> None:
        """The router's control endpoint listens at CONTROL_URL."""
        self.control_url = control_url

    def register(self) -> None:
        """Be in the volume's attachments (again: a manager on a new store forgets them)."""
        if self.control_url is None or not self.client.token:
            return
        try:
            record = self.client.volume(self.volume)
            if self.control_url not in record.get("attachments", []):
                path = f"/v1/volumes/{self.volume}/attachments"
                self.client.call("POST", path, {"control_url": self.control_url})
                log.info("registered %s with the manager", self.control_url)
            self._warned = False
        except ManagerError as exc:
            if not self._warned:
                log.warning("cannot register with the manager (following by poll): %s", exc)
                self._warned = True

    async def current(self) -> tuple[str, int] | None:
        try:
            return await asyncio.to_thread(primary_endpoint, self.client, self.volume)
        except (ManagerError, KeyError, TypeError, ValueError) as exc:
            log.warning("cannot read volume %s from the manager: %s", self.volume, exc)
            return None

    async def wait(self, timeout: float) -> tuple[str, int]:
        """The primary's (endpoint, generation), waiting up to TIMEOUT for the manager to know
        it."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = await self.current()
            if found is not None:
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise Refused(503, f"the manager knows no running primary for {self.volume}")
            await asyncio.sleep(self.interval)

    async def first(self, target: Target, timeout: float) -> None:
        """Point TARGET at the primary, waiting up to TIMEOUT for the manager to know it."""
        await target.repoint(*await self.wait(timeout))

    async def run(self, target: Target) -> None:
        """Repoint whenever the manager's (endpoint, generation) differs from TARGET's, every
        interval or at once when `wake` is set."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval)
            self.wake.clear()
            await asyncio.to_thread(self.register)
            found = await self.current()
            if found is None:
                continue
            uri, generation = found
            now = (target.upstream_uri, target.generation)
            if (uri, generation) == now and target.upstream_alive:
                continue  # unchanged; the same endpoint after a loss is a reconnect (restart)
            if generation < target.generation:
                continue  # a switchover pushed a newer primary than this (lagging) answer names
            try:
                # no replay flag: the router replays its unflushed writes (it cannot know
                # whether the new primary has them; only the manager's push can say so)
                result = await target.repoint(uri, generation)
                log.info("followed the manager to %s generation %d: %s", uri, generation, result)
            except Refused as exc:
                log.warning("manager's primary %s (generation %d) refused: %s", uri, generation,
                            exc)  # fmt: skip
