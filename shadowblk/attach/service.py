"""The attach process: the router, its NBD listener, its control endpoint, until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web

from shadowblk.attach.control import make_app
from shadowblk.attach.downstream import Downstream
from shadowblk.attach.router import Router

log = logging.getLogger(__name__)


def _url(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run(
    volume: str,
    listen: tuple[str, int],
    first: Callable[[Router], Awaitable[None]],
    control: tuple[str, int] | None,
    hold_time: float,
    follow: Callable[[Router], Awaitable[None]] | None = None,
    control_bound: Callable[[str], None] | None = None,
) -> None:
    """Connect the first upstream (FIRST), then serve until SIGTERM/SIGINT; CONTROL_BOUND
    learns the control endpoint's URL once it listens."""
    router = Router(hold_time=hold_time)
    await first(router)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await Downstream(router, volume, reader, writer).serve()

    server = await asyncio.start_server(client, *listen)
    host, port = server.sockets[0].getsockname()[:2]
    runner = None
    if control is not None:
        runner = web.AppRunner(make_app(router), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, *control)
        await site.start()
        log.info("control endpoint at %s", runner.addresses)
        if control_bound is not None:
            control_bound(f"http://{_url(*runner.addresses[0][:2])}")
    follower = asyncio.get_running_loop().create_task(follow(router)) if follow else None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"ready nbd://{_url(host, port)}/{volume}", flush=True)
    sys.stdout.flush()
    await stop.wait()
    log.info("stopping")
    if follower is not None:
        follower.cancel()
    server.close()
    if runner is not None:
        await runner.cleanup()
    await router.close()
