"""Delivering notifications: every one to the log, and to each webhook in the background.

A webhook that is slow or down must not hold the evaluation up, so each message goes through
a queue; a failed POST is retried with backoff a few times and then given up with a log line
(the alert still shows on the dashboard and in /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from shadowblk.manager.alerts.alertmanager import payload
from shadowblk.manager.alerts.engine import Notification

log = logging.getLogger("shadowblk.alerts")

ATTEMPTS = 4
TIMEOUT_S = 5.0


def to_log(n: Notification) -> None:
    a = n.alert
    if n.ends_at is None:
        level = logging.ERROR if a.severity == "critical" else logging.WARNING
        log.log(level, "alert firing [%s] %s: %s", a.severity, a.name, a.summary)
    else:
        log.info("alert resolved %s: %s", a.name, a.resolved)


class Webhooks:
    """Posts notifications to URLS, in order, from one background task."""

    def __init__(self, urls: list[str], external_url: str = "") -> None:
        self.urls, self.external_url = urls, external_url
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)
        self._task: asyncio.Task | None = None
        self.delivered = 0
        self.failed = 0

    def start(self) -> None:
        if self.urls and self._task is None:
            self._task = asyncio.create_task(self._run(), name="webhooks")

    def send(self, n: Notification) -> None:
        if not self.urls:
            return
        try:
            self._queue.put_nowait(payload(n, self.external_url))
        except asyncio.QueueFull:
            self.failed += 1
            log.error("webhook queue full: dropping %s %s", n.status, n.alert.name)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                message = await self._queue.get()
                for url in self.urls:
                    await self._post(session, url, message)

    async def _post(self, session: aiohttp.ClientSession, url: str, message: dict) -> None:
        for attempt in range(ATTEMPTS):
            try:
                async with session.post(url, json=message) as reply:
                    if reply.status < 300:
                        self.delivered += 1
                        return
                    why = f"HTTP {reply.status}"
            except (aiohttp.ClientError, TimeoutError) as err:
                why = repr(err)
            log.warning("webhook %s attempt %d failed: %s", url, attempt + 1, why)
            await asyncio.sleep(0.5 * 2**attempt)
        self.failed += 1
        log.error("webhook %s: giving up on %s", url, message["alerts"][0]["labels"])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
