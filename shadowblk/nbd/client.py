"""A small blocking NBD client: fixed newstyle, NBD_OPT_GO, pipelined requests.

Used by the tests (to know exactly which writes were acknowledged, and to speak raw protocol at
the server) and by anything in shadowblk that needs to read a served volume.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from shadowblk.nbd import protocol as P


class NBDError(Exception):
    """The server answered a request or an option with an error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Reply:
    cookie: int
    error: int
    data: bytes = b""


class NBDClient:
    def __init__(
        self,
        host: str,
        port: int,
        name: str = "",
        structured: bool = False,
        meta: bool = False,
        timeout: float = 30.0,
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.structured = False
        self._cookie = 0
        self._pending_reads: dict[int, int] = {}
        magic, opt, _flags = P.SERVER_GREETING.unpack(self.recv(P.SERVER_GREETING.size))
        if (magic, opt) != (P.NBDMAGIC, P.IHAVEOPT):
            raise NBDError(0, "not a fixed newstyle NBD server")
        self.send(P.CLIENT_FLAGS.pack(P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES))
        if structured:
            self.option(P.OPT_STRUCTURED_REPLY, b"")
            self.structured = True
        if meta:
            query = P.META_BASE_ALLOCATION.encode()
            raw = name.encode()
            data = P.U32.pack(len(raw)) + raw + P.U32.pack(1) + P.U32.pack(len(query)) + query
            self.option(P.OPT_SET_META_CONTEXT, data)
        raw = name.encode()
        replies = self.option(
            P.OPT_GO, P.U32.pack(len(raw)) + raw + struct.pack(">HH", 1, P.INFO_BLOCK_SIZE)
        )
        self.size = self.flags = 0
        for rtype, data in replies:
            if rtype == P.REP_INFO and struct.unpack_from(">H", data)[0] == P.INFO_EXPORT:
                _, self.size, self.flags = P.INFO_EXPORT_DATA.unpack(data)

    # --- bytes ---
    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- handshake ---
    def option(self, option: int, data: bytes) -> list[tuple[int, bytes]]:
        """Send an option; collect replies up to the final one. NBDError on an error reply."""
        self.send(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, rtype, length = P.OPTION_REPLY.unpack(self.recv(P.OPTION_REPLY.size))
            if magic != P.OPT_REPLY_MAGIC or opt != option:
                raise NBDError(0, f"bad option reply {magic:#x} for {opt}")
            payload = self.recv(length)
            if rtype & (1 << 31):
                raise NBDError(rtype, payload.decode(errors="replace"))
            if rtype == P.REP_ACK:
                return replies
            replies.append((rtype, payload))

    # --- transmission ---
    def request(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> int:
        """Send one request without waiting; returns its cookie."""
        self._cookie += 1
        self.send(
            P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, self._cookie, offset, length) + payload
        )
        if cmd == P.CMD_READ:
            self._pending_reads[self._cookie] = length
        return self._cookie

    def reply(self) -> Reply:
        """The next reply (all chunks of it, for structured replies)."""
        magic = P.U32.unpack(self.recv(4))[0]
        if magic == P.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv(12))
            length = self._pending_reads.pop(cookie, 0)
            return Reply(cookie, error, self.recv(length) if length and not error else b"")
        if magic != P.STRUCTURED_REPLY_MAGIC:
            raise NBDError(0, f"bad reply magic {magic:#x}")
        data = bytearray()
        error = 0
        while True:
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv(16))
            body = self.recv(length)
            if rtype == P.REPLY_TYPE_OFFSET_DATA:
                data += body[8:]
            elif rtype == P.REPLY_TYPE_BLOCK_STATUS:
                data += body
            elif rtype & (1 << 15):
                error = P.U32.unpack_from(body)[0]
            if flags & P.REPLY_FLAG_DONE:
                self._pending_reads.pop(cookie, None)
                return Reply(cookie, error, bytes(data))
            magic = P.U32.unpack(self.recv(4))[0]

    def _call(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> bytes:
        self.request(cmd, offset, length, flags, payload)
        reply = self.reply()
        if reply.error:
            raise NBDError(reply.error, f"{P.COMMAND_NAMES.get(cmd, cmd)} failed: {reply.error}")
        return reply.data

    def pread(self, offset: int, length: int) -> bytes:
        return self._call(P.CMD_READ, offset, length)

    def pwrite(self, data: bytes, offset: int, fua: bool = False) -> None:
        self._call(P.CMD_WRITE, offset, len(data), P.CMD_FLAG_FUA if fua else 0, data)

    def flush(self) -> None:
        self._call(P.CMD_FLUSH)

    def trim(self, offset: int, length: int) -> None:
        self._call(P.CMD_TRIM, offset, length)

    def zero(self, offset: int, length: int, flags: int = 0) -> None:
        self._call(P.CMD_WRITE_ZEROES, offset, length, flags)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) extents of base:allocation."""
        body = self._call(P.CMD_BLOCK_STATUS, offset, length)[4:]
        return [P.EXTENT.unpack_from(body, i) for i in range(0, len(body), 8)]

    def disconnect(self) -> None:
        self.request(P.CMD_DISC)
        self.close()
