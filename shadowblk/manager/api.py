"""The manager's HTTP JSON API (aiohttp): routes, request parsing, authorisation.

The handlers only parse and check: validation against the OpenAPI document (api_schema), the
bearer token and the leadership for changes (a standby answers 503 naming the leader), then
the work itself runs on the store thread (service.Fleet).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from aiohttp import web

from shadowblk.manager import metrics, scrubs
from shadowblk.manager.alerts import config as alerts_config
from shadowblk.manager.api_errors import ApiError, json_errors
from shadowblk.manager.api_schema import check, document
from shadowblk.manager.app import Manager
from shadowblk.manager.auth import require_bearer
from shadowblk.manager.dashboard import routes as dashboard
from shadowblk.manager.dashboard.observer import Observer
from shadowblk.manager.switchover import Switchovers

MAX_BODY = 64 * 1024  # the largest request body: a heartbeat with SMART data fits many times
EVENTS_LIMIT = 100


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


async def _body(request: web.Request, schema: str) -> dict[str, Any]:
    """The request's JSON body, checked against the document's SCHEMA (400 / 413 / 422)."""
    raw = await request.read()  # aiohttp raises 413 past client_max_size
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"the request body is not JSON: {err}") from None
    try:  # JSON's \ud800 escapes decode to lone surrogates, which no store can keep as text
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(400, "the request body is not Unicode text: a lone surrogate") from None
    check(schema, data)
    return data


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    check("Name", name, "name")
    return name


def _query_int(request: web.Request, key: str, default: int, low: int, high: int) -> int:
    text = request.query.get(key)
    if text is None:
        return default
    if not re.fullmatch(r"\d{1,19}", text) or not low <= int(text) <= high:
        raise ApiError(422, f"{key}: must be an integer from {low} to {high}, not {text!r}")
    return int(text)


class Api:
    """The route handlers of one manager."""

    def __init__(self, manager: Manager, token: str) -> None:
        self.manager, self.token = manager, token

    async def _may_change(self, request: web.Request) -> int:
        """401 without the token, 503 on a standby; the leader's fencing token otherwise."""
        require_bearer(request.headers.get("Authorization"), self.token)
        return await self.manager.fence()

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document())

    async def list_servers(self, request: web.Request) -> web.Response:
        return web.json_response({"servers": await self.manager.run(self.manager.fleet.servers)})

    async def get_server(self, request: web.Request) -> web.Response:
        name = _name(request)
        return web.json_response(await self.manager.run(self.manager.fleet.server, name))

    async def register_server(self, request: web.Request) -> web.Response:
        await self._may_change(request)
        body = await _body(request, "ServerRegistration")
        fleet = self.manager.fleet
        return web.json_response(await self.manager.run(fleet.register, body, time.time()))

    async def heartbeat(self, request: web.Request) -> web.Response:
        name = _name(request)
        await self._may_change(request)
        body = await _body(request, "Heartbeat")
        fleet = self.manager.fleet
        return web.json_response(await self.manager.run(fleet.heartbeat, name, body, time.time()))

    async def report_switchover(self, request: web.Request) -> web.Response:
        name = _name(request)
        await self._may_change(request)
        body = await _body(request, "SwitchoverResult")
        fleet = self.manager.fleet
        event = await self.manager.run(fleet.report_switchover, name, body)
        return web.json_response(event, status=201)

    async def switchover(self, request: web.Request) -> web.Response:
        name = _name(request)
        fence = await self._may_change(request)
        body = await _body(request, "SwitchoverRequest")
        reason = body.get("reason", "operator")
        switchovers = self.manager.switchovers
        return web.json_response(await switchovers.planned(name, body.get("to"), reason, fence))

    async def device_lost(self, request: web.Request) -> web.Response:
        """The primary's agent saw the volume's device go (udev): an emergency switchover now."""
        name = _name(request)
        fence = await self._may_change(request)
        body = await _body(request, "DeviceLost")
        reason = body.get("reason") or "the primary's device is gone"
        record = await self.manager.switchovers.lost(name, body["server"], reason, fence)
        return web.json_response(record)

    async def scrub(self, request: web.Request) -> web.StreamResponse:
        """The live scrub of a volume by its primary's agent, its answer lines streamed."""
        name = _name(request)
        await self._may_change(request)  # with --repair it writes: the leader's, as changes
        body = await _body(request, "ScrubRequest")
        where = await self.manager.run(scrubs.plan, self.manager.store, name)
        return await scrubs.forward(request, name, where, body, self.token)

    async def drain_server(self, request: web.Request) -> web.Response:
        name = _name(request)
        await self._may_change(request)
        body = await _body(request, "DrainRequest")
        records = await self.manager.drain_server(name, body.get("reason", "drain"))
        return web.json_response({"switchovers": records})

    async def list_switchovers(self, request: web.Request) -> web.Response:
        volume = request.query.get("volume")
        if volume is not None:
            check("Name", volume, "volume")
        limit = _query_int(request, "limit", EVENTS_LIMIT, 1, 1000)
        found = await self.manager.run(self.manager.fleet.switchovers, volume, limit)
        return web.json_response({"switchovers": found})

    async def attach(self, request: web.Request) -> web.Response:
        name = _name(request)
        await self._may_change(request)
        body = await _body(request, "Attachment")
        fleet = self.manager.fleet
        volume = await self.manager.run(fleet.attach, name, body["control_url"])
        return web.json_response(volume, status=201)

    async def list_volumes(self, request: web.Request) -> web.Response:
        return web.json_response({"volumes": await self.manager.run(self.manager.fleet.volumes)})

    async def create_volume(self, request: web.Request) -> web.Response:
        fence = await self._may_change(request)
        body = await _body(request, "VolumeCreate")
        fleet = self.manager.fleet
        return web.json_response(
            await self.manager.run(fleet.create_volume, body, fence), status=201
        )

    async def get_volume(self, request: web.Request) -> web.Response:
        name = _name(request)
        return web.json_response(await self.manager.run(self.manager.fleet.volume, name))

    async def delete_volume(self, request: web.Request) -> web.Response:
        name = _name(request)
        fence = await self._may_change(request)
        fleet = self.manager.fleet
        return web.json_response(await self.manager.run(fleet.delete_volume, name, fence))

    async def unblock(self, request: web.Request) -> web.Response:
        """The operator's decision after an aborted switchover: the store's primary is the
        volume's copy after all (docs/switchover.md)."""
        name = _name(request)
        fence = await self._may_change(request)
        fleet = self.manager.fleet
        return web.json_response(await self.manager.run(fleet.unblock, name, fence))

    async def explain(self, request: web.Request) -> web.Response:
        name = _name(request)
        return web.json_response(await self.manager.run(self.manager.fleet.explain, name))

    async def status(self, request: web.Request) -> web.Response:
        summary = await self.manager.run(self.manager.fleet.status)
        here = {"url": self.manager.url, "leading": self.manager.leading}
        return web.json_response({"manager": here, **summary})

    async def events(self, request: web.Request) -> web.Response:
        since = _query_int(request, "since", 0, 0, 2**63 - 1)
        limit = _query_int(request, "limit", EVENTS_LIMIT, 1, 1000)
        found = await self.manager.run(self.manager.fleet.events, since, limit)
        return web.json_response({"events": found})


def make_app(manager: Manager, token: str) -> web.Application:
    """The aiohttp application serving MANAGER's API; changes need TOKEN."""
    api = Api(manager, token)
    manager.switchovers = Switchovers(manager, token)
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
    app.add_routes(
        [
            web.get("/openapi.json", api.openapi),
            web.get("/v1/servers", api.list_servers),
            web.post("/v1/servers", api.register_server),
            web.get("/v1/servers/{name}", api.get_server),
            web.post("/v1/servers/{name}/heartbeat", api.heartbeat),
            web.get("/v1/volumes", api.list_volumes),
            web.post("/v1/volumes", api.create_volume),
            web.get("/v1/volumes/{name}", api.get_volume),
            web.delete("/v1/volumes/{name}", api.delete_volume),
            web.get("/v1/volumes/{name}/placement", api.explain),
            web.post("/v1/volumes/{name}/switchover-results", api.report_switchover),
            web.post("/v1/volumes/{name}/switchover", api.switchover),
            web.post("/v1/volumes/{name}/emergency", api.device_lost),
            web.post("/v1/volumes/{name}/unblock", api.unblock),
            web.post("/v1/volumes/{name}/scrub", api.scrub),
            web.post("/v1/volumes/{name}/attachments", api.attach),
            web.post("/v1/servers/{name}/drain", api.drain_server),
            web.get("/v1/switchovers", api.list_switchovers),
            web.get("/v1/status", api.status),
            web.get("/v1/events", api.events),
        ]
    )
    try:
        observer = Observer(manager, alerts_config.load())
    except alerts_config.ConfigError as err:
        raise SystemExit(f"Error: {err}") from None
    dashboard.mount(app, observer)
    app.router.add_get("/metrics", metrics.handler(observer))
    return app
