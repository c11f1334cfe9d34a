"""The dashboard's routes: the page and its files, and the live stream (server-sent events).

Server-sent events rather than a WebSocket: the page only listens, EventSource reconnects by
itself, and it is plain HTTP through any proxy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from shadowblk.manager.dashboard.observer import Observer

STATIC = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "plot.js": "text/javascript",
    "style.css": "text/css",
}
KEEPALIVE_S = 15.0


def _file(name: str) -> web.Response:
    text = resources.files("shadowblk.manager.dashboard").joinpath("static", name).read_text()
    return web.Response(text=text, content_type=STATIC[name], headers={"Cache-Control": "no-cache"})


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard/")


async def page(request: web.Request) -> web.Response:
    return _file("index.html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return _file(name)


def stream(observer: Observer) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        """One `data:` line per monitoring round; the first carries the plotted history."""
        reply = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await reply.prepare(request)
        queue = observer.subscribe()
        try:
            if observer.state is not None:
                first = {"state": observer.state, "history": list(observer.history.samples)}
                await reply.write(f"data: {json.dumps(first)}\n\n".encode())
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await reply.write(b": keep-alive\n\n")
                    continue
                if message is None:  # the manager is stopping
                    break
                await reply.write(f"data: {json.dumps(message)}\n\n".encode())
        except ConnectionResetError:
            pass  # the page was closed
        finally:
            observer.unsubscribe(queue)
        return reply

    return handler


def mount(app: web.Application, observer: Observer) -> None:
    """Add the dashboard to APP and run OBSERVER's rounds while APP runs."""
    app.on_startup.append(observer.start)
    app.on_shutdown.append(observer.end_streams)
    app.on_cleanup.append(observer.stop)
    app.add_routes(
        [
            web.get("/dashboard", redirect),
            web.get("/dashboard/", page),
            web.get("/dashboard/static/{file}", static),
            web.get("/dashboard/stream", stream(observer)),
        ]
    )
