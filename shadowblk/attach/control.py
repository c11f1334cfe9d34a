"""The control endpoint for the manager and tests: POST /repoint, /pause, /resume, GET /status.

Every failure is `{"error": message}` with a 4xx (the caller's fault) or 502 (the new
upstream's): bad input never reaches the router and never stops it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from shadowblk.attach.router import Refused, Router

MAX_BODY = 64 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (404, 405, 413) in the same JSON shape as ours."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)


def make_app(router: Router) -> web.Application:
    async def status(_request: web.Request) -> web.Response:
        return web.json_response(router.status())

    async def repoint(request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        uri, generation = body.get("uri"), body.get("generation")
        if not isinstance(uri, str) or not uri:
            return _error(422, "uri: a string nbd://HOST:PORT/NAME is required")
        if type(generation) is not int or not 0 <= generation < 2**63:
            return _error(422, "generation: an integer 0 <= generation < 2^63 is required")
        replay = body.get("replay", False)
        if type(replay) is not bool:
            return _error(422, "replay: true or false")
        try:
            result = await router.repoint(uri, generation, replay)
        except Refused as exc:
            return _error(exc.status, str(exc))
        return web.json_response(result.to_dict())

    async def pause(request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        limit = body.get("limit_s", 10.0)
        if type(limit) not in (int, float) or not 0 < limit <= 600:
            return _error(422, "limit_s: a number of seconds, 0 < limit_s <= 600")
        return web.json_response({"drain_ms": await router.pause(float(limit))})

    async def resume(_request: web.Request) -> web.Response:
        router.resume()
        return web.json_response({"paused": router.paused})

    app = web.Application(client_max_size=MAX_BODY, middlewares=[_json_errors])
    app.router.add_get("/status", status)
    app.router.add_post("/repoint", repoint)
    app.router.add_post("/pause", pause)
    app.router.add_post("/resume", resume)
    return app


async def _body(request: web.Request) -> dict | web.Response:
    """The JSON object in the request's body, or the refusal to answer with."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _error(413, f"body over {MAX_BODY} bytes")
    try:
        body = json.loads(await request.content.read(MAX_BODY + 1) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        return _error(400, f"body is not JSON: {exc}")
    if not isinstance(body, dict):
        return _error(422, "body must be a JSON object")
    return body
