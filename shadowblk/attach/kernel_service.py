"""The `attach --dm` process: /dev/mapper/NAME over the kernel NBD client, the control
endpoint (the router's: POST /repoint, GET /status), until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from shadowblk.attach.control import make_app
from shadowblk.attach.kernel import KernelAttach

log = logging.getLogger(__name__)


async def run(name: str, uri: str, generation: int, control: tuple[str, int] | None) -> None:
    attach = KernelAttach(name)
    await asyncio.to_thread(attach.start, uri, generation)
    runner = None
    try:
        if control is not None:
            runner = web.AppRunner(make_app(attach), access_log=None)  # type: ignore[arg-type]
            await runner.setup()
            await web.TCPSite(runner, *control).start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        print(f"ready {attach.device} over {attach.nbd.device if attach.nbd else '-'}", flush=True)
        await stop.wait()
    finally:
        if runner is not None:
            await runner.cleanup()
        await asyncio.to_thread(attach.close)
