"""The agent's control endpoint: the manager's switchover steps, called directly (HTTP JSON).

Orders that can wait ride on heartbeat answers; a switchover cannot wait for the next
heartbeat while the VM's I/O is held, so the manager calls these at once:

    POST /v1/volumes/NAME/drain    {"timeout": S}      -> the primary shipped what it has
    POST /v1/volumes/NAME/fence    {"drain": S}        -> the old primary's final epoch
                                   ("dirty": G: with `dirty` since seen's answer, below)
    POST /v1/volumes/NAME/hold     {"seconds": S}      -> the shadow server refuses NAME for
                                                          up to S s while it changes role (0: end)
    POST /v1/volumes/NAME/prepare  {"volume": {...}}   -> a standby `serve` on the shadow
    POST /v1/volumes/NAME/prime    {"wait": S}         -> the shadow server checkpointed NAME
                                                          (answered within S s: "checkpointed")
    POST /v1/volumes/NAME/handover {"seconds": S}      -> the shadow server let go of NAME (its
                                                          checkpoint made) and refuses it for S s,
                                                          ahead of `promote` (0: takes it back)
    POST /v1/volumes/NAME/promote  {"volume": {...}}   -> endpoint, epoch, steps_ms (NAME held
                                                          by the shadow server until `hold` 0)
    POST /v1/volumes/NAME/demote   {"volume": {...}}   -> "resync" or "full-sync"
    POST /v1/volumes/NAME/dirty    {"generation": G}   -> the primary's blocks dirtied since
                                                          its last verify, their map crcs ("keep":
                                                          the map is kept; "since": "seen": only
                                                          the blocks changed since the kept map)
    POST /v1/volumes/NAME/crcs     {"blocks": B, ...}  -> the shadow's data crcs of B
    POST /v1/volumes/NAME/blocks   {"blocks": [...]}   -> the old primary's data of blocks
    POST /v1/volumes/NAME/repair   {"blocks", "data"}  -> those blocks written on the shadow
    POST /v1/volumes/NAME/discrepancies {...}          -> logged on the new primary
(the checksum compare before a promotion: shadowblk/agent/dirty_check.py)
    POST /v1/devices  {"action", "name": "sbk-VOL", "devnode"}  -> {"emergency": bool}
(from this host's udev rule, `shadowblk notify-device`, with the fleet's token or the local
one of RUN_DIR/agent.json: a removed device of a primary here asks for its emergency
switchover, shadowblk/agent/devices.py)
    POST /v1/volumes/NAME/scrub    {"repair": B, ...}  -> the live scrub of the primary and its
                                                          shadows, streamed as JSON lines
                                                          (shadowblk/agent/scrub_call.py)

The volume document is the manager's after the generation was raised. Every call needs the
fleet's bearer token. A refusal is `{"error": message}` with 400 (bad request), 401, 404 (no such
call) or 409 (this server cannot do it now).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from shadowblk.agent import dirty_check, scrub_call
from shadowblk.agent.hosting import Endpoint, Hosting
from shadowblk.agent.switch import SwitchError
from shadowblk.agent.udev_watch import PREFIX, DeviceEvent

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
CALLS = (
    "drain|fence|hold|prepare|prime|handover|promote|demote|dirty|crcs|blocks|repair"
    "|discrepancies|scrub"
)
PATH = re.compile(rf"^/v1/volumes/([A-Za-z0-9][A-Za-z0-9._-]{{0,62}})/({CALLS})$")
DEVICES = "/v1/devices"
DEVICE_NAME = re.compile(rf"^{PREFIX}[A-Za-z0-9][A-Za-z0-9._-]{{0,62}}$")
ACTIONS = ("add", "change", "remove")


class Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _volume(body: dict[str, Any]) -> dict[str, Any]:
    volume = body.get("volume")
    if not isinstance(volume, dict) or not isinstance(volume.get("generation"), int):
        raise Refusal(400, "volume: the volume document (with its generation) is required")
    return volume


def actions(hosting: Hosting) -> dict[str, Callable[[str, dict[str, Any]], Any]]:
    """What each call does to HOSTING."""
    return {
        "drain": lambda name, body: hosting.drain(name, float(body.get("timeout", 30.0))),
        "fence": lambda name, body: hosting.fence(
            name,
            float(body.get("drain", 5.0)),
            None if body.get("dirty") is None else int(body["dirty"]),
        ),
        "hold": lambda name, body: (
            hosting.hold(name, float(body.get("seconds", 60.0))) or {"ok": True}
        ),
        "prepare": lambda name, body: hosting.prepare(name, _volume(body)) or {"ok": True},
        "prime": lambda name, body: hosting.prime(name, float(body.get("wait", 5.0))),
        "handover": lambda name, body: hosting.handover(name, float(body.get("seconds", 120.0))),
        "promote": lambda name, body: hosting.promote(name, _volume(body)),
        "demote": lambda name, body: {"resync": hosting.demote(name, _volume(body))},
        "dirty": lambda name, body: dirty_check.primary_dirty(
            hosting.data_dir,
            name,
            int(body["generation"]),
            keep=bool(body.get("keep")),
            since_seen=body.get("since") == "seen",
        ),
        "crcs": lambda name, body: dirty_check.shadow_crcs(hosting.data_dir, name, body),
        "blocks": lambda name, body: dirty_check.read_blocks(
            hosting.data_dir, name, list(body["blocks"])
        ),
        "repair": lambda name, body: dirty_check.repair(hosting.data_dir, name, body),
        "discrepancies": lambda name, body: dirty_check.log_discrepancies(
            hosting.data_dir, name, body
        ),
        "scrub": lambda name, body: scrub_call.start(hosting, name, body),
    }


def device_event(body: dict[str, Any]) -> DeviceEvent:
    """The udev event a notifier posted, checked."""
    action, name, devnode = body.get("action"), body.get("name"), body.get("devnode")
    if action not in ACTIONS:
        raise Refusal(400, f"action: one of {', '.join(ACTIONS)}")
    if not isinstance(name, str) or not DEVICE_NAME.match(name):
        raise Refusal(400, f"name: {PREFIX}VOLUME is required")
    if devnode is not None and (not isinstance(devnode, str) or len(devnode) > 4096):
        raise Refusal(400, "devnode: a path or null")
    return DeviceEvent(action, name, devnode, "")


def serve_control(
    listen: Endpoint,
    hosting: Hosting,
    token: str | None,
    devices: Callable[[DeviceEvent], bool] | None = None,
    local_token: str | None = None,
) -> ThreadingHTTPServer:
    """Serve the control calls at LISTEN (port 0: any free port) in a daemon thread; device
    events (POST /v1/devices) go to DEVICES, with the fleet's TOKEN or LOCAL_TOKEN."""
    calls = actions(hosting)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            log.debug("control: " + format, *args)

        def _answer(self, status: int, doc: Any) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, lines: Iterator[dict[str, Any]]) -> None:
            """200, then one JSON object per line as they come; the end of the body is the
            end of the connection (HTTP/1.0). A caller that hangs up stops the scrub."""
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            try:
                for line in lines:
                    self.wfile.write(json.dumps(line).encode() + b"\n")
                    self.wfile.flush()
            except OSError as err:
                log.warning("control call %s: the caller hung up: %s", self.path, err)
            finally:
                close = getattr(lines, "close", None)
                if close is not None:
                    close()

        def do_POST(self) -> None:
            try:
                result = self._call()
            except Refusal as err:
                self._answer(err.status, {"error": str(err)})
            except (ValueError, TypeError) as err:
                self._answer(400, {"error": f"bad request: {err}"})
            except (SwitchError, dirty_check.CheckError) as err:
                self._answer(409, {"error": str(err)})
            except (OSError, LookupError) as err:
                log.exception("control call %s failed", self.path)
                self._answer(409, {"error": f"{type(err).__name__}: {err}"})
            except Exception as err:  # a bug: said, and the agent goes on
                log.exception("control call %s failed", self.path)
                self._answer(500, {"error": f"{type(err).__name__}: {err}"})
            else:
                if isinstance(result, Iterator):
                    self._stream(result)
                else:
                    self._answer(200, result)

        def _call(self) -> Any:
            if self.path == DEVICES and devices is not None:
                self._authorize(token, local_token)
                return {"emergency": devices(device_event(self._body()))}
            match = PATH.match(self.path)
            if match is None:
                raise Refusal(404, f"no call {self.path}")
            self._authorize(token)
            body = self._body()
            name, call = match.groups()
            log.info("control: %s %s", call, name)
            return calls[call](name, body)

        def _authorize(self, *tokens: str | None) -> None:
            given = self.headers.get("Authorization", "").encode()
            wanted = [f"Bearer {t}".encode() for t in tokens if t]
            if wanted and not any(hmac.compare_digest(given, w) for w in wanted):
                raise Refusal(401, "a valid bearer token is required")

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= MAX_BODY:
                raise Refusal(400, f"a body of 0 to {MAX_BODY} bytes is required")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as err:
                raise Refusal(400, f"the body is not JSON: {err}") from None
            if not isinstance(body, dict):
                raise Refusal(400, "the body must be a JSON object")
            return body

    server = ThreadingHTTPServer((listen.host, listen.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
    return server
