"""STATE_DIR/scrub.sock: how `shadowblk scrub --state-dir DIR` asks a running `serve` to scrub.

The server holds the volume's checksum map and its write order, so the scrub runs here
(shadowblk.integrity.live_scrub), in the connection's thread, one at a time. The socket is
owner-only (0600): whoever may use it may already read the state folder. One JSON line asks:

    {"op": "scrub", "repair": false, "rate": null, "shadow": "HOST:PORT", "server": null}

(`rate` in bytes/s, `shadow` a shadow's verify port, reached with this server's replication
key or TLS, `server` the name in the records); the answer is JSON lines: `{"phase": "primary",
"done": N, "total": T}` as the scan goes, then `{"report": {...}}` or `{"error": "why"}`. A
client that hangs up stops its scrub. Nothing here runs while no scrub is asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shadowblk.integrity.discrepancies import DiscrepancyLog
from shadowblk.integrity.live_scrub import LiveScrub, LiveVolume, ScrubStopped
from shadowblk.integrity.tree_client import TreeClient
from shadowblk.integrity.tree_wire import WireError

log = logging.getLogger(__name__)

SOCKET_FILE = "scrub.sock"
MAX_LINE = 4096
PROGRESS_EVERY = 0.2  # seconds between progress lines
CLIENT_TIMEOUT = 60.0  # a client that sends no request, or reads no progress, this long is gone
FIELDS = {"op": str, "repair": bool, "rate": (int, float, type(None))}
OPTIONAL = {"shadow": (str, type(None)), "server": (str, type(None))}


class RequestError(ValueError):
    """A request line this endpoint will not run."""


def parse_request(line: bytes) -> dict[str, Any]:
    """The checked request of one line, or RequestError saying what is wrong with it."""
    if len(line) > MAX_LINE:
        raise RequestError(f"request longer than {MAX_LINE} bytes")
    try:
        request = json.loads(line)
    except ValueError as exc:
        raise RequestError(f"not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError("a request is a JSON object")
    kinds = {**FIELDS, **OPTIONAL}
    for name, value in request.items():
        if name not in kinds:
            raise RequestError(f"unknown field {name!r}")
        if not isinstance(value, kinds[name]) or (isinstance(value, bool) and name == "rate"):
            raise RequestError(f"field {name!r}: {value!r} is not of the right type")
    missing = [name for name in FIELDS if name not in request]
    if missing:
        raise RequestError(f"missing fields: {', '.join(missing)}")
    if request["op"] != "scrub":
        raise RequestError(f"unknown op {request['op']!r}")
    rate = request["rate"]
    if rate is not None and (not math.isfinite(rate) or rate <= 0):
        raise RequestError("rate must be a positive number of bytes/s, or null")
    shadow = request.get("shadow")
    if shadow is not None:
        host, sep, port = shadow.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RequestError(f"shadow {shadow!r} is not HOST:PORT")
    return request


class ClientGone(Exception):
    """The client hung up: its scrub stops."""


class ScrubEndpoint:
    """The listening socket and the one scrub it may be running."""

    def __init__(
        self, state_dir: Path, volume: LiveVolume, key: bytes | None, tls: ssl.SSLContext | None
    ) -> None:
        self.path = state_dir / SOCKET_FILE
        self.volume = volume
        self.key, self.tls = key, tls
        self.log = DiscrepancyLog.in_state_dir(state_dir)
        self.busy = threading.Lock()
        self.stopping = threading.Event()
        self._client: TreeClient | None = None  # the running scrub's shadow connection
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a dead server's: this one holds the map's lock, so no other runs
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o600)  # before listen: nobody else can connect in between (and no
        # process-wide umask change under the server's other threads)
        self._sock.listen(4)
        threading.Thread(target=self._accept, name="scrub-control", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT)
        with conn, conn.makefile("rwb") as stream:
            try:
                request = parse_request(stream.readline(MAX_LINE + 1))
            except RequestError as exc:
                self._send(stream, {"error": f"bad request: {exc}"})
                return
            if not self.busy.acquire(blocking=False):
                self._send(stream, {"error": "a scrub of this volume is already running"})
                return
            try:
                self._send(stream, self._scrub(request, stream))
            except (ClientGone, OSError):
                log.warning("scrub stopped: its client hung up")
            finally:
                self.busy.release()

    def _scrub(self, request: dict[str, Any], stream: Any) -> dict[str, Any]:
        total = self.volume.map.size * (2 if request.get("shadow") else 1)
        done, last = 0, 0.0

        def progress(phase: str, nbytes: int) -> None:
            nonlocal done, last
            done += nbytes
            if time.monotonic() - last >= PROGRESS_EVERY or done == total:
                last = time.monotonic()
                try:
                    self._send(stream, {"phase": phase, "done": done, "total": total})
                except OSError as exc:
                    raise ClientGone(str(exc)) from exc

        scrub = LiveScrub(self.volume, self.log, request.get("server"), self.stopping, progress)
        try:
            with self._shadow(request.get("shadow")) as shadow:
                report = scrub.run(request["repair"], request["rate"], shadow)
        except (WireError, OSError, ValueError, ScrubStopped) as exc:
            return {"error": f"scrub did not finish: {exc}"}
        log.info("scrub: %d found, %d repaired", len(report.discrepancies), report.repaired)
        return {"report": report.as_dict(self.log.path)}

    @contextlib.contextmanager
    def _shadow(self, address: str | None) -> Any:
        if address is None:
            yield None
            return
        if self.key is None and self.tls is None:
            raise ValueError("this server has no replication key or TLS for a verify port")
        host, _, port = address.rpartition(":")
        with TreeClient(host.strip("[]"), int(port), self.key, self.tls) as client:
            self._client = client
            try:
                yield client
            finally:
                self._client = None

    @staticmethod
    def _send(stream: Any, message: dict[str, Any]) -> None:
        stream.write(json.dumps(message).encode() + b"\n")
        stream.flush()

    def close(self) -> None:
        """At a clean stop, before the map closes: stop a running scrub and wait for it."""
        self.stopping.set()
        self._sock.close()
        client = self._client
        if client is not None:  # a shadow's SCAN can take long: cut it short
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_RDWR)
        with self.busy:  # a primary scan stops at its next window
            self.path.unlink(missing_ok=True)


def open_endpoint(
    state_dir: Path, volume: LiveVolume, key: bytes | None, tls: ssl.SSLContext | None
) -> ScrubEndpoint | None:
    """The endpoint, or None (logged) if the socket cannot be made: serving goes on without."""
    try:
        return ScrubEndpoint(state_dir, volume, key, tls)
    except OSError as exc:
        log.error("no live scrub for this volume: %s: %s", state_dir / SOCKET_FILE, exc)
        return None


def ask(state_dir: Path, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The client side: send REQUEST to the server of STATE_DIR and yield each answer line
    (progress lines, then a report or an error). Raises OSError if no server listens there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(state_dir / SOCKET_FILE))
        with sock.makefile("rwb") as stream:
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            for line in stream:
                yield json.loads(line)
