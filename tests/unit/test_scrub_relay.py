"""The manager relaying a scrub's lines (shadowblk/manager/scrubs.py): a caller hanging up is not
mistaken for the agent going away (aiohttp's ClientConnectionResetError is both a ClientError
and a ConnectionResetError), the handler ends quietly and the agent's scrub is let go."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from shadowblk.manager import scrubs

LINE = b'{"progress": {"done": 1, "total": 1000}}\n'


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"{host}:{port}"


async def hang_up_mid_scrub() -> dict[str, Any]:
    """A caller reads the first lines of a scrub that never ends, then closes its connection."""
    seen: dict[str, Any] = {"agent_lines": 0}
    agent_gone, handler_done = asyncio.Event(), asyncio.Event()

    async def agent_scrub(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:  # a scrub of hours: it ends when the manager hangs up
                await response.write(LINE)
                seen["agent_lines"] += 1
                await asyncio.sleep(0.02)
        except ConnectionResetError:
            agent_gone.set()
        return response

    async def manager_scrub(request: web.Request) -> web.StreamResponse:
        try:
            return await scrubs.forward(request, "v1", where, {}, "token")
        except BaseException as err:
            seen["raised"] = err
            raise
        finally:
            handler_done.set()

    agent = web.Application()
    agent.router.add_post("/v1/volumes/v1/scrub", agent_scrub)
    manager = web.Application()
    manager.router.add_post("/scrub", manager_scrub)
    agent_runner, agent_address = await serve(agent)
    manager_runner, manager_address = await serve(manager)
    where = {"control": agent_address, "primary": "s1", "shadows": [], "skipped": ["s3"]}
    try:
        async with aiohttp.ClientSession() as session:
            reply = await session.post(f"http://{manager_address}/scrub")
            assert reply.status == 200
            seen["first"] = await reply.content.readline()
            seen["second"] = await reply.content.readline()
            reply.close()  # the caller hangs up
        await asyncio.wait_for(handler_done.wait(), 20)
        await asyncio.wait_for(agent_gone.wait(), 20)
    finally:
        await manager_runner.cleanup()
        await agent_runner.cleanup()
    return seen


def test_a_caller_hanging_up_ends_the_relay_and_the_agent_s_scrub(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=scrubs.__name__)
    seen = asyncio.run(hang_up_mid_scrub())
    assert b"not scrubbed" in seen["first"] and seen["second"] == LINE
    assert "raised" not in seen, seen["raised"]
    said = [r.getMessage() for r in caplog.records]
    assert any("the caller hung up" in m for m in said), said
    assert not any("stopped answering" in m for m in said), said
