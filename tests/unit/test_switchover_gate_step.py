"""The planned switchover's gate step runs beside the generation's CAS: a router that is gone
and a store that cannot forget it must not make the step raise (the CAS would then be done
with nothing fenced, promoted or resumed)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from shadowblk.manager.store import StoreError
from shadowblk.manager.switchover import Switchovers


class _Fleet:
    def __init__(self) -> None:
        self.detached: list[str] = []

    def detach(self, volume: str, url: str) -> None:
        self.detached.append(url)
        raise StoreError("the store timed out")


class _Manager:
    def __init__(self) -> None:
        self.fleet = _Fleet()

    async def run(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_gone_router_the_store_cannot_forget_does_not_fail_the_step() -> None:
    manager = _Manager()
    switchovers = Switchovers(manager, "token")
    url = f"http://127.0.0.1:{_closed_port()}"  # nobody listens: connection refused

    async def gate() -> dict:
        try:
            return await switchovers._each_attach("vol1", [url], "pause", {"limit_s": 1})
        finally:
            await switchovers.close()

    assert asyncio.run(gate()) == {}
    assert manager.fleet.detached == [url]
