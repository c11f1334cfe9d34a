"""The agent's control endpoint: the manager's switchover steps, called directly (HTTP JSON).

Orders that can wait ride on heartbeat answers; a switchover cannot wait for the next
heartbeat while the VM's I/O is held, so the manager calls these at once:

    POST /v1/volumes/NAME/drain    {"timeout": S}      -> the primary shipped what it has
    POST /v1/volumes/NAME/fence    {"drain": S}        -> the old primary's final epoch
    POST /v1/volumes/NAME/hold     {"seconds": S}      -> the shadow server stopped for up to
                                                          S s while NAME changes role (0: start)
    POST /v1/volumes/NAME/prepare  {"volume": {...}}   -> a standby `serve` on the shadow
    POST /v1/volumes/NAME/promote  {"volume": {...}}   -> endpoint, epoch (the shadow server
                                                          held until `hold` 0)
    POST /v1/volumes/NAME/demote   {"volume": {...}}   -> "resync" or "full-sync"

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
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from shadowblk.agent.hosting import Endpoint, Hosting
from shadowblk.agent.switch import SwitchError

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
CALLS = "drain|fence|hold|prepare|promote|demote"
PATH = re.compile(rf"^/v1/volumes/([A-Za-z0-9][A-Za-z0-9._-]{{0,62}})/({CALLS})$")


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
        "fence": lambda name, body: hosting.fence(name, float(body.get("drain", 5.0))),
        "hold": lambda name, body: (
            hosting.hold(name, float(body.get("seconds", 60.0))) or {"ok": True}
        ),
        "prepare": lambda name, body: hosting.prepare(name, _volume(body)) or {"ok": True},
        "promote": lambda name, body: hosting.promote(name, _volume(body)),
        "demote": lambda name, body: {"resync": hosting.demote(name, _volume(body))},
    }


def serve_control(listen: Endpoint, hosting: Hosting, token: str | None) -> ThreadingHTTPServer:
    """Serve the control calls at LISTEN (port 0: any free port) in a daemon thread."""
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

        def do_POST(self) -> None:
            try:
                self._answer(200, self._call())
            except Refusal as err:
                self._answer(err.status, {"error": str(err)})
            except (ValueError, TypeError) as err:
                self._answer(400, {"error": f"bad request: {err}"})
            except SwitchError as err:
                self._answer(409, {"error": str(err)})
            except (OSError, LookupError) as err:
                log.exception("control call %s failed", self.path)
                self._answer(409, {"error": f"{type(err).__name__}: {err}"})
            except Exception as err:  # a bug: said, and the agent goes on
                log.exception("control call %s failed", self.path)
                self._answer(500, {"error": f"{type(err).__name__}: {err}"})

        def _call(self) -> Any:
            match = PATH.match(self.path)
            if match is None:
                raise Refusal(404, f"no call {self.path}")
            given = self.headers.get("Authorization", "")
            if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise Refusal(401, "a valid bearer token is required")
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= MAX_BODY:
                raise Refusal(400, f"a body of 0 to {MAX_BODY} bytes is required")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as err:
                raise Refusal(400, f"the body is not JSON: {err}") from None
            if not isinstance(body, dict):
                raise Refusal(400, "the body must be a JSON object")
            name, call = match.groups()
            log.info("control: %s %s", call, name)
            return calls[call](name, body)

    server = ThreadingHTTPServer((listen.host, listen.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
    return server
