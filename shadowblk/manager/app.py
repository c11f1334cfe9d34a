"""One manager process: its store thread, its leadership, the leader's background work, and
serving the API until SIGTERM.

Every store call runs on one thread (the store was opened there: SQLite connections belong to
their thread, and one thread keeps one manager's changes in order). Each manager keeps
campaigning; the one that leads watches heartbeats and is the only one that accepts changes.
A standby still answers reads from the shared store and refuses changes with a 503 that names
the leader, which the client follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from shadowblk.manager.api_errors import ApiError
from shadowblk.manager.leader import LeaderElection, election_for
from shadowblk.manager.service import Fleet
from shadowblk.manager.store import open_store
from shadowblk.manager.switchover import Switchovers

log = logging.getLogger(__name__)

T = TypeVar("T")
CAMPAIGN_EVERY_S = 0.5
SILENCE_SLACK_S = 0.01  # the watch wakes this long after a heartbeat's timeout is due
MIN_ROUND_S = 0.02


class Manager:
    """The state one manager process keeps around its store."""

    def __init__(self, store_url: str, heartbeat_timeout_s: float, lease_ttl_s: int = 3) -> None:
        self.heartbeat_timeout_s, self.lease_ttl_s = heartbeat_timeout_s, lease_ttl_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="store")
        self.store = self._pool.submit(open_store, store_url).result()
        self.fleet = Fleet(self.store, lease_s=heartbeat_timeout_s)
        self.switchovers: Switchovers | None = None  # given by the API (it holds the token)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.url = ""
        self.election: LeaderElection | None = None
        self._tasks: list[asyncio.Task] = []
        self._watch: asyncio.Task | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """FN(*ARGS) on the store thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @property
    def leading(self) -> bool:
        return self.election is not None and self.election.is_leader

    async def fence(self) -> int:
        """This manager's fencing token if it leads; a 503 naming the leader otherwise."""
        token = self.election.token if self.election is not None and self.leading else None
        if token is not None:
            return token
        leader = await self.run(self.store.leader)
        raise ApiError(
            503,
            "this manager is a standby: changes go to the leader",
            {"leader": leader.holder if leader else None},
        )

    async def start(self, url: str) -> None:
        """Campaign under URL (the address other managers and clients are sent to): once at
        once, so that a lone manager leads when it says it is ready, then in the background."""
        self.url = url
        self._loop = asyncio.get_running_loop()
        self.election = await self.run(election_for, self.store, url, self.lease_ttl_s)
        await self._leadership_round()
        self._tasks.append(asyncio.create_task(self._lead(), name="leadership"))

    async def _lead(self) -> None:
        while True:
            await asyncio.sleep(CAMPAIGN_EVERY_S)
            await self._leadership_round()

    async def _leadership_round(self) -> None:
        """Campaign while standing by; start the leader's work on winning, stop it on losing."""
        assert self.election is not None
        try:
            if self.election.token is None:
                if await self.run(self.election.campaign, 0):
                    log.info("%s leads with fencing token %s", self.url, self.election.token)
                    self._watch = asyncio.create_task(self._watch_heartbeats())
            elif not self.election.is_leader:
                log.warning("%s lost the leadership: standing by", self.url)
                await self._stop_watch()
                await self.run(self.election.resign)
        except Exception:  # the store may be away for a while: keep trying, say why
            log.exception("leadership round failed")

    async def _watch_heartbeats(self) -> None:
        """Mark down the servers that stopped heartbeating, after a grace period for agents
        to find a new leader."""
        await asyncio.sleep(self.heartbeat_timeout_s)
        while True:
            try:
                for name in await self.run(
                    self.fleet.mark_silent_down, self.heartbeat_timeout_s, time.time()
                ):
                    log.warning("server %s is down: no heartbeat for %.1f s", name,
                                self.heartbeat_timeout_s)  # fmt: skip
                if self.switchovers is not None and self.election and self.election.token:
                    await self.switchovers.watch(self.election.token)
            except Exception:
                log.exception("heartbeat watch round failed")
            await asyncio.sleep(await self._until_next_round())

    async def _until_next_round(self) -> float:
        """The next watch round: when the first up server's heartbeat times out (an emergency
        switchover then starts within SILENCE_SLACK_S of the timeout, not up to a third of it
        later), and at least every third of the timeout (at most 1 s) for the rest of the
        watch's work. Marking a server down on time changes nothing for I3: the promotion
        still waits for the old primary's lease (manager/switchover.py)."""
        cadence = min(1.0, self.heartbeat_timeout_s / 3)
        try:
            until = await self.run(self.fleet.next_silence, self.heartbeat_timeout_s, time.time())
        except Exception:
            log.exception("cannot read the servers' heartbeats")
            return cadence
        if until is None:
            return cadence
        return min(cadence, max(until + SILENCE_SLACK_S, MIN_ROUND_S))

    async def drain_server(self, name: str, reason: str) -> list[dict[str, Any]]:
        """Planned switchover of every primary on server NAME; one record per volume (also in
        the store). ApiError 503 on a standby."""
        assert self.switchovers is not None
        return await self.switchovers.drain(name, reason, await self.fence())

    def start_drain(self, name: str, reason: str) -> None:
        """drain_server from any thread, without waiting (the failure predictor calls it from
        the store thread, which the drain itself needs): the outcome is logged and recorded."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._drain_logged(name, reason), self._loop)

    async def _drain_logged(self, name: str, reason: str) -> None:
        try:
            records = await self.drain_server(name, reason)
        except Exception:
            log.exception("drain of %s failed", name)
            return
        log.warning("drained %s (%s): %s", name, reason,
                    [(r["volume"], r["outcome"]) for r in records])  # fmt: skip

    async def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    async def close(self) -> None:
        """Stop campaigning, hand the leadership over at once, close the store."""
        await self._stop_watch()
        if self.switchovers is not None:
            await self.switchovers.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.election is not None and self.election.token is not None:
            await self.run(self.election.resign)
        await self.run(self.store.close)
        self._pool.shutdown()


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    manager: Manager, app: web.Application, host: str, port: int, advertise: str | None
) -> None:
    """Listen, print `ready URL`, and serve until SIGTERM or SIGINT; then stop cleanly."""
    runner = web.AppRunner(app, access_log=log)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    url = url_of(host, bound)
    await manager.start(advertise or url)
    print(f"ready {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()
    await manager.close()
