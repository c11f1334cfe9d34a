"""The `attach --dm` process: /dev/mapper/NAME over the kernel NBD client, the control
endpoint (the router's: POST /repoint, GET /status), until SIGTERM. With a follower (--manager)
the first primary and every later one come from the manager's volume map, as for the router."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from shadowblk.attach.control import make_app
from shadowblk.attach.follow import Follower
from shadowblk.attach.kernel import KernelAttach
from shadowblk.attach.service import _url

log = logging.getLogger(__name__)


async def run(
    attach: KernelAttach,
    upstream: tuple[str, int] | Follower,
    control: tuple[str, int] | None,
) -> None:
    """Serve ATTACH from UPSTREAM, (nbd:// URI, generation) or the manager's map."""
    follower = upstream if isinstance(upstream, Follower) else None
    if follower is not None:
        attach.on_lost = follower.wake.set
        await attach.open(*await follower.wait(attach.hold_time))
    else:
        await attach.open(*upstream)
    runner = None
    following = None
    try:
        if control is not None:
            runner = web.AppRunner(make_app(attach), access_log=None)  # type: ignore[arg-type]
            await runner.setup()
            await web.TCPSite(runner, *control).start()
            if follower is not None:
                follower.announce(f"http://{_url(*control)}")
        if follower is not None:
            following = asyncio.get_running_loop().create_task(follower.run(attach))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        print(f"ready {attach.device} over {attach.nbd.device if attach.nbd else '-'}", flush=True)
        await stop.wait()
    finally:
        if following is not None:
            following.cancel()
        if runner is not None:
            await runner.cleanup()
        await asyncio.to_thread(attach.close)
