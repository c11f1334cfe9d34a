"""POST /v1/volumes/NAME/scrub: the manager asks the primary's agent to scrub the volume live,
against each shadow's verify port, and streams the agent's answer lines on to the caller
(`shadowblk scrub VOLUME`, docs/integrity.md).

Refusals before the scrub starts are the API's JSON errors: 404 no such volume, 409 its primary
is down or has no control address, 502 its agent cannot be reached or refused. Once the first
line is sent the status is 200: a failure later is an `{"error": ...}` line.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from shadowblk.manager.api_errors import ApiError
from shadowblk.manager.store import Store
from shadowblk.manager.store.model import ServerState

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # the scrub itself may take hours: only the connection is timed


def plan(store: Store, name: str) -> dict[str, Any]:
    """Where NAME's scrub runs (its primary's agent) and the shadows' verify addresses; the
    shadows that cannot take part (down, no verify port registered) are named in `skipped`."""
    volume = store.get_volume(name)  # NotFound: 404
    servers = {s.name: s for s in store.list_servers()}
    primary = servers.get(volume.primary)
    if primary is None or primary.state is ServerState.DOWN or not primary.control_address:
        raise ApiError(
            409, f"{name}: its primary {volume.primary} is not up with a control address"
        )
    shadows, skipped = [], []
    for server_name in volume.shadow_servers():
        server = servers.get(server_name)
        if server is None or server.state is ServerState.DOWN or not server.verify_address:
            skipped.append(server_name)
        else:
            shadows.append(server.verify_address)
    return {"primary": primary.name, "control": primary.control_address,
            "shadows": shadows, "skipped": skipped}  # fmt: skip


async def forward(
    request: web.Request, name: str, where: dict[str, Any], body: dict[str, Any], token: str
) -> web.StreamResponse:
    """Ask the agent in WHERE (plan) to scrub NAME with BODY's options; relay its lines."""
    call = {**body, "shadows": where["shadows"], "server": where["primary"]}
    url = f"http://{where['control']}/v1/volumes/{name}/scrub"
    agent = f"the agent of {where['primary']} at {where['control']}"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            reply = await session.post(url, json=call, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise ApiError(502, f"{agent} cannot be reached: {type(err).__name__}: {err}") from None
        async with reply:
            if reply.status != 200:
                try:
                    said = (await reply.json(content_type=None)).get("error", reply.reason)
                except (ValueError, AttributeError, aiohttp.ClientError):
                    said = reply.reason
                raise ApiError(502, f"{agent} refused the scrub: {said}")
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            try:
                await _relay(response, reply, name, agent, where["skipped"])
            except ConnectionResetError:  # the caller hung up: leaving stops the agent's scrub
                log.warning("scrub of %s: the caller hung up", name)
            return response


async def _relay(
    response: web.StreamResponse,
    reply: aiohttp.ClientResponse,
    name: str,
    agent: str,
    skipped: list[str],
) -> None:
    """The agent's lines on to the caller, and an error line if the agent stops without its
    report. ConnectionResetError: the caller hung up (aiohttp's ClientConnectionResetError is
    also a ClientError: told apart here by what raised it, the write to the caller)."""
    if skipped:
        warning = f"the shadows on {', '.join(skipped)} are not scrubbed: down or no verify port"
        await response.write(json.dumps({"warning": warning}).encode() + b"\n")
    tail = b""  # the last line so far: the report or an error, if the agent finished
    chunks = reply.content.iter_any()
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except (aiohttp.ClientError, TimeoutError) as err:
            log.warning("scrub of %s: %s stopped answering: %s", name, agent, err)
            break
        await response.write(chunk)
        tail += chunk
        tail = tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1 :]
    if not (tail.endswith(b"\n") and tail.startswith((b'{"report"', b'{"error"'))):
        said = {"error": f"{agent} ended the scrub without a report"}
        await response.write(json.dumps(said).encode() + b"\n")
    await response.write_eof()
