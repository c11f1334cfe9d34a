"""The asking side of the verify port: one blocking connection to a shadow's `--verify-listen`,
counting every byte that crosses the socket (the greeting and tags included)."""

from __future__ import annotations

import os
import socket
import ssl

from shadowblk.delta.frames import NONCE_SIZE
from shadowblk.integrity.tree_compare import ERROR
from shadowblk.integrity.tree_wire import (
    GREETING,
    HEADER,
    MAX_REPLY,
    OPEN,
    OPEN_REPLY,
    READ,
    READ_REQUEST,
    REFUSAL,
    REQUEST,
    SCAN,
    SCAN_ENTRY,
    SCAN_REPLY,
    SCAN_REQUEST,
    STATUS_REFUSED,
    Channel,
    WireError,
    pack_greeting,
    unpack_greeting,
)

CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 60.0  # an OPEN of a big volume builds its tree first


class TreeClient:
    """A connection to a shadow's verify port. `send` is tree_compare's transport."""

    def __init__(
        self,
        host: str,
        port: int,
        key: bytes | None,
        tls: ssl.SSLContext | None,
        timeout: float = REPLY_TIMEOUT,
    ) -> None:
        if key is None and tls is None:
            raise ValueError("the verify port needs the shared key or TLS")
        self.address = f"{host}:{port}"
        self.bytes_sent = 0
        self.bytes_received = 0
        sock = socket.create_connection((host, port), CONNECT_TIMEOUT)
        try:
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = tls.wrap_socket(sock) if tls else sock
        except BaseException:
            sock.close()
            raise
        try:
            self.channel = self._greet(key)
        except BaseException:
            self.close()
            raise

    def _greet(self, key: bytes | None) -> Channel:
        nonce = os.urandom(NONCE_SIZE)
        self._write(pack_greeting(nonce, key is not None))
        theirs = unpack_greeting(self._read(GREETING.size))
        if theirs.status == STATUS_REFUSED:
            (length,) = REFUSAL.unpack(self._read(REFUSAL.size))
            raise WireError(
                f"{self.address} refused: {self._read(length).decode(errors='replace')}"
            )
        return Channel(key, nonce, theirs.nonce, sends=REQUEST)

    def send(self, request: bytes) -> bytes:
        """One request, its reply (an error reply is returned, not raised: the caller reads
        tree_compare's FF)."""
        self._write(self.channel.pack(request))
        header = self._read(HEADER.size)
        length = self.channel.payload_length(header, MAX_REPLY)
        body = self._read(length + self.channel.tag_size)
        return self.channel.accept(header, body[:length], body[length:])

    def open(self, volume: str) -> tuple[int, bool]:
        """Ask the shadow to snapshot VOLUME's map: (its epoch, whether it was closed clean).
        The HELLO/CHILDREN that follow are answered from that snapshot."""
        reply = self.send(bytes([OPEN]) + volume.encode())
        if reply[:1] == bytes([ERROR]):
            raise WireError(f"{self.address}: {reply[1:].decode(errors='replace')}")
        if reply[:1] != bytes([OPEN]) or len(reply) != 1 + OPEN_REPLY.size:
            raise WireError(f"{self.address}: malformed OPEN reply ({len(reply)} bytes)")
        epoch, clean = OPEN_REPLY.unpack_from(reply, 1)
        return epoch, bool(clean)

    def read(self, offset: int, length: int) -> bytes:
        """Whole blocks of the opened volume, which the shadow checked against its map."""
        reply = self._expect(READ, self.send(bytes([READ]) + READ_REQUEST.pack(offset, length)))
        if len(reply) != length:
            raise WireError(f"{self.address}: READ answered {len(reply)} bytes, not {length}")
        return reply

    def scan(
        self, rate: int = 0, timeout: float | None = None
    ) -> tuple[list[tuple[int, ...]], bool]:
        """Have the shadow check the opened volume's image against its map (RATE bytes/s, 0
        unlimited; it reads the whole image, hence its own TIMEOUT, None: none): [(block, data
        crc, map crc)] of its rotted blocks, and whether that list is complete."""
        previous = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            reply = self._expect(SCAN, self.send(bytes([SCAN]) + SCAN_REQUEST.pack(rate)))
        finally:
            self.sock.settimeout(previous)
        if len(reply) < SCAN_REPLY.size:
            raise WireError(f"{self.address}: malformed SCAN reply ({len(reply)} bytes)")
        complete, count = SCAN_REPLY.unpack_from(reply)
        if len(reply) != SCAN_REPLY.size + count * SCAN_ENTRY.size:
            raise WireError(f"{self.address}: SCAN reply of {len(reply)} bytes for {count} blocks")
        entries = [
            SCAN_ENTRY.unpack_from(reply, SCAN_REPLY.size + i * SCAN_ENTRY.size)
            for i in range(count)
        ]
        return entries, bool(complete)

    def _expect(self, code: int, reply: bytes) -> bytes:
        """The body of a reply of kind CODE; an error reply raises with the shadow's reason."""
        if reply[:1] == bytes([ERROR]):
            raise WireError(f"{self.address}: {reply[1:].decode(errors='replace')}")
        if reply[:1] != bytes([code]):
            raise WireError(f"{self.address}: unexpected reply {reply[:1].hex()} to {code:02x}")
        return reply[1:]

    def _write(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.bytes_sent += len(data)

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise WireError(f"{self.address} closed the connection")
            buf += chunk
        self.bytes_received += n
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TreeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
