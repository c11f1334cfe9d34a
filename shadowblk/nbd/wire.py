"""A blocking byte stream over a plain or TLS socket: exact reads, whole sends.

Reads never take more bytes than asked for from a plain socket, so when the handshake hands the
socket to the fast transmission loop no request bytes are stranded in a Python buffer.
"""

from __future__ import annotations

import select
import socket
import ssl


class Disconnected(Exception):
    """The peer closed the connection or the socket failed."""


class Wire:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @property
    def is_tls(self) -> bool:
        return isinstance(self.sock, ssl.SSLSocket)

    def recv_exact(self, n: int) -> bytes:
        """Exactly N bytes, or Disconnected if the stream ends first."""
        chunks: list[bytes] = []
        need = n
        while need:
            try:
                chunk = self.sock.recv(min(need, 1 << 20))
            except (OSError, ssl.SSLError) as exc:
                raise Disconnected(str(exc)) from None
            if not chunk:
                raise Disconnected(f"end of stream with {need} of {n} bytes still expected")
            chunks.append(chunk)
            need -= len(chunk)
        return b"".join(chunks)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            raise Disconnected(str(exc)) from None

    def readable(self, timeout: float) -> bool:
        """Whether a read would not block, waiting at most TIMEOUT seconds."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)
