"""One asyncio NBD client connection to the volume's current primary, with pipelining.

Many requests are in flight at once on one connection; replies are matched by cookie. Simple
replies only (structured replies are not negotiated), so a READ reply is a header followed by
the data when, and only when, its error is zero. A request's completion is a callback (no task
per request on the hot path). When the connection drops, every pending request completes with
LOST, so the router can hold it and retry it on the next primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from shadowblk.attach.batch import Batcher
from shadowblk.nbd import protocol as P

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


class UpstreamError(Exception):
    """The upstream could not be reached or refused the handshake."""


LOST = -1  # the error a request gets when the connection dropped before its reply: unknown
Done = Callable[[int, bytes], None]


@dataclass(frozen=True)
class Target:
    """Where an NBD export lives: nbd://HOST:PORT/NAME."""

    host: str
    port: int
    name: str

    @classmethod
    def parse(cls, uri: str) -> Target:
        parts = urlsplit(uri)
        if parts.scheme != "nbd" or not parts.hostname:
            raise UpstreamError(f"not an nbd://HOST[:PORT]/NAME URI: {uri!r}")
        try:
            port = parts.port or 10809
        except ValueError:
            raise UpstreamError(f"bad port in {uri!r}") from None
        return cls(parts.hostname, port, parts.path.lstrip("/"))

    def __str__(self) -> str:
        return f"nbd://{self.host}:{self.port}/{self.name}"


class Upstream:
    """A connected, negotiated NBD client; many requests may be pending at once."""

    def __init__(
        self, target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.target = target
        self.size = 0
        self.flags = 0
        self._reader, self._writer = reader, writer
        self._out = Batcher(writer)
        self._cookies = itertools.count(1)
        self._pending: dict[int, tuple[Done, int]] = {}
        self._reader_task: asyncio.Task | None = None
        self.lost: asyncio.Event = asyncio.Event()

    @classmethod
    async def connect(cls, uri: str) -> Upstream:
        """Connect to URI and negotiate its export (NBD_OPT_GO)."""
        target = Target.parse(uri)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {target}: {exc}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:  # small requests go out at once, not after a delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = cls(target, reader, writer)
        try:
            await asyncio.wait_for(up._handshake(), CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, struct.error) as exc:
            writer.close()
            raise UpstreamError(f"handshake with {target} failed: {exc!r}") from None
        except UpstreamError:
            writer.close()
            raise
        up._reader_task = asyncio.get_running_loop().create_task(up._read_replies())
        return up

    async def _handshake(self) -> None:
        r, w = self._reader, self._writer
        magic, opt_magic, hflags = P.SERVER_GREETING.unpack(await r.readexactly(18))
        if magic != P.NBDMAGIC or opt_magic != P.IHAVEOPT:
            raise UpstreamError(f"{self.target} is not a newstyle NBD server")
        if not hflags & P.FLAG_FIXED_NEWSTYLE:
            raise UpstreamError(f"{self.target} does not speak fixed newstyle")
        cflags = P.CLIENT_FLAG_FIXED_NEWSTYLE | (hflags & P.FLAG_NO_ZEROES)
        name = self.target.name.encode()
        data = P.U32.pack(len(name)) + name + struct.pack(">H", 0)
        header = P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(data))
        w.write(P.CLIENT_FLAGS.pack(cflags) + header + data)
        await w.drain()
        while True:
            _magic, _option, rtype, length = P.OPTION_REPLY.unpack(await r.readexactly(20))
            payload = await r.readexactly(length)
            if rtype == P.REP_ACK:
                break
            if rtype & (1 << 31):
                msg = payload.decode(errors="replace")
                raise UpstreamError(f"{self.target} refused the export: {rtype:#x} {msg}")
            if rtype == P.REP_INFO and len(payload) >= 2:
                (info,) = struct.unpack_from(">H", payload)
                if info == P.INFO_EXPORT:
                    _, self.size, self.flags = P.INFO_EXPORT_DATA.unpack(payload)
        if not self.flags & P.TFLAG_HAS_FLAGS:
            self.flags = P.TFLAG_HAS_FLAGS

    async def _read_replies(self) -> None:
        reason = "closed"
        try:
            while True:
                magic, error, cookie = P.SIMPLE_REPLY.unpack(await self._reader.readexactly(16))
                if magic != P.SIMPLE_REPLY_MAGIC:
                    reason = f"bad reply magic {magic:#x}"
                    return
                done, read_len = self._pending.pop(cookie, (None, 0))
                if done is None:
                    reason = f"reply to unknown cookie {cookie}"
                    return
                data = await self._reader.readexactly(read_len) if read_len and not error else b""
                done(error, data)
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason = repr(exc)
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        if not self.lost.is_set():
            log.warning("upstream %s lost: %s", self.target, reason)
        self.lost.set()
        pending, self._pending = self._pending, {}
        for done, _ in pending.values():
            done(LOST, b"")
        self._writer.close()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def send(
        self, cmd: int, flags: int, offset: int, length: int, payload: bytes, done: Done
    ) -> None:
        """Send one request; DONE(error, data) runs on its reply, or with LOST if none comes."""
        if self.lost.is_set():
            done(LOST, b"")
            return
        cookie = next(self._cookies)
        self._pending[cookie] = (done, length if cmd == P.CMD_READ else 0)
        header = P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        self._out.write(header, payload)

    async def call(
        self, cmd: int, flags: int, offset: int, length: int, payload: bytes = b""
    ) -> tuple[int, bytes]:
        """Send one request and wait for its reply: (error, data); error LOST if none came."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()

        def done(error: int, data: bytes) -> None:
            if not fut.done():
                fut.set_result((error, data))

        self.send(cmd, flags, offset, length, payload, done)
        return await fut

    async def close(self) -> None:
        """Say goodbye politely (NBD_CMD_DISC) and drop the connection."""
        if not self.lost.is_set():
            try:
                self._out.flush()
                self._writer.write(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 0, 0, 0))
                await asyncio.wait_for(self._writer.drain(), 1.0)
            except (OSError, ConnectionError, TimeoutError):
                pass
        self.lost.set()  # a planned close: nothing to warn about
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._writer.close()
