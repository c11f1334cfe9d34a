"""The listener: accepts clients, runs each connection's handshake and transmission on its own
thread, and stops cleanly (stop accepting, finish in-flight requests, flush, save tracking).

A misbehaving client only ever ends its own connection.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from shadowblk.nbd.handshake import Export, HandshakeError, negotiate
from shadowblk.nbd.transmission import ProtocolViolation, StopSignal, serve
from shadowblk.nbd.wire import Disconnected
from shadowblk.tracking.tracker import WriteTracker

log = logging.getLogger(__name__)

MAX_CLIENTS = 64


@dataclass
class _Client:
    sock: socket.socket
    peer: str
    in_handshake: bool = True


class NBDServer:
    def __init__(
        self,
        export: Export,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        tracker: WriteTracker | None = None,
        native: bool = True,
        on_quiet: Callable[[], None] | None = None,
    ) -> None:
        """ON_QUIET runs at a clean stop once every request finished and the volume is
        flushed, before the tracker and the volume close (the replicator drains there)."""
        self.export = export
        self.on_quiet = on_quiet
        self.tls = tls
        self.tracker = tracker
        self.native = native
        self.stopping = StopSignal()
        self._clients: dict[threading.Thread, _Client] = {}
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.host, self.port = self._listener.getsockname()[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export.name}"

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT begin a clean stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.stop())

    def stop(self) -> None:
        self.stopping.set()

    def serve_forever(self) -> None:
        """Accept clients until stop(); then drain them and make everything durable."""
        try:
            while not self.stopping.is_set():
                try:
                    sock, peer = self._listener.accept()
                except TimeoutError:
                    continue
                self._start(sock, f"{peer[0]}:{peer[1]}")
        finally:
            self._listener.close()
            self._drain()

    def _start(self, sock: socket.socket, peer: str) -> None:
        with self._lock:
            if len(self._clients) >= MAX_CLIENTS:
                log.warning("refusing %s: already %d clients", peer, MAX_CLIENTS)
                sock.close()
                return
            client = _Client(sock, peer)
            thread = threading.Thread(target=self._run, args=(client,), name=f"nbd {peer}")
            self._clients[thread] = client
        thread.start()

    def _run(self, client: _Client) -> None:
        sock = client.sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.info("client %s connected", client.peer)
        try:
            session = negotiate(sock, self.export, self.tls, self.stopping.is_set)
            client.in_handshake = False
            if session is not None:
                sock = session.wire.sock
                serve(session, self.tracker, self.stopping, native=self.native)
        except (HandshakeError, ProtocolViolation, Disconnected) as exc:
            log.warning("client %s dropped: %s", client.peer, exc)
        except Exception:
            log.exception("client %s dropped after an internal error", client.peer)
        finally:
            sock.close()
            with self._lock:
                self._clients.pop(threading.current_thread(), None)
            log.info("client %s gone", client.peer)

    def _drain(self) -> None:
        """Wake clients still haggling, wait for the rest to finish their in-flight requests."""
        with self._lock:
            clients = dict(self._clients)
        for client in clients.values():
            if client.in_handshake:
                with contextlib.suppress(OSError):
                    client.sock.shutdown(socket.SHUT_RDWR)
        for thread in clients:
            thread.join()
        if not self.export.backend.read_only:
            self.export.backend.flush()
        try:
            if self.on_quiet is not None:
                self.on_quiet()
        finally:
            if self.tracker is not None:
                self.tracker.close()
            self.export.backend.close()
