"""The manager's monitoring round, once a second: read the fleet, keep its history, evaluate
the alerts (on the leader only, so that several managers do not alert twice), deliver what
changed, and push the new state to every open dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web

from shadowblk.manager.alerts.config import AlertsConfig
from shadowblk.manager.alerts.delivery import Webhooks, to_log
from shadowblk.manager.alerts.engine import AlertEngine
from shadowblk.manager.app import Manager
from shadowblk.manager.dashboard.history import History
from shadowblk.manager.dashboard.state import document
from shadowblk.manager.dashboard.view import FleetReader, FleetView

log = logging.getLogger(__name__)


class Observer:
    """Holds the latest view, the alerts and the history; feeds /metrics and the dashboard."""

    def __init__(self, manager: Manager, config: AlertsConfig) -> None:
        self.manager, self.config = manager, config
        self.reader = FleetReader(manager.store)
        self.engine = AlertEngine(config.thresholds)
        self.webhooks = Webhooks(config.webhooks)
        self.history = History()
        self.view: FleetView | None = None
        self.state: dict[str, Any] | None = None
        self.subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._task: asyncio.Task | None = None

    async def start(self, app: web.Application) -> None:
        self.webhooks.start()
        self._task = asyncio.create_task(self._loop(), name="observer")

    async def stop(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.webhooks.close()

    async def _loop(self) -> None:
        while True:
            try:
                await self.round()
            except Exception:  # the store may be away for a while: keep going, say why
                log.exception("monitoring round failed")
            await asyncio.sleep(self.config.evaluate_every_s)

    async def round(self) -> None:
        view = await self.manager.run(self.reader.read)
        self.view = view
        point = self.history.add(view)
        if self.manager.leading:
            self.webhooks.external_url = self.manager.url
            for n in self.engine.evaluate(view):
                to_log(n)
                self.webhooks.send(n)
        else:
            self.engine.firing.clear()  # the leader alerts; a standby forgets, silently
        self.state = document(view, self.engine.active(), self.manager.leading)
        for queue in self.subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait({"state": self.state, "sample": point})

    async def end_streams(self, app: web.Application) -> None:
        """Tell every open stream to end (None), so a stopping manager does not wait for the
        pages to go away."""
        for queue in self.subscribers:
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=16)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self.subscribers.discard(queue)
