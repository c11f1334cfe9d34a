"""The server side toward the VM's NBD client: a small handshake for one export, then requests.

Its own asyncio handshake rather than shadowblk.nbd.handshake.negotiate: that one is blocking,
bound to a Backend, and computes the transmission flags from it, while the router must offer
exactly what its upstream supports. Only simple replies are offered (structured replies, and
with them BLOCK_STATUS and DF, are refused), so replies relay without reassembly.

Requests are pipelined: each is handed to the router with a completion callback that carries
the client's cookie (the router uses its own toward the upstream). A client that breaks the
protocol is disconnected alone; the router keeps serving the others.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct

from shadowblk.attach.batch import Batcher
from shadowblk.attach.router import Router
from shadowblk.nbd import protocol as P

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0
MAX_IN_FLIGHT = 256  # per client: a client that pipelines more waits (back-pressure)
KNOWN_CMD_FLAGS = P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO

# the command -> the transmission flag that must be advertised for it
NEEDS_FLAG = {
    P.CMD_FLUSH: P.TFLAG_SEND_FLUSH,
    P.CMD_TRIM: P.TFLAG_SEND_TRIM,
    P.CMD_WRITE_ZEROES: P.TFLAG_SEND_WRITE_ZEROES,
    P.CMD_CACHE: P.TFLAG_SEND_CACHE,
}
WRITING = (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES)


class ProtocolError(Exception):
    """The client broke the protocol: disconnect it."""


class Downstream:
    """One client connection of the router."""

    def __init__(
        self, router: Router, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.router, self.name = router, name
        self.reader, self.writer = reader, writer
        self.out = Batcher(writer)
        self.peer = writer.get_extra_info("peername")
        self.outstanding = 0  # requests submitted and not yet answered
        self.settled = asyncio.Event()
        self.settled.set()
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def serve(self) -> None:
        try:
            if await asyncio.wait_for(self._handshake(), HANDSHAKE_TIMEOUT):
                await self._transmission()
        except TimeoutError:
            log.warning("client %s: handshake timed out", self.peer)
        except ProtocolError as exc:
            log.warning("client %s disconnected: %s", self.peer, exc)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            log.info("client %s went away: %r", self.peer, exc)
        finally:
            await self.settled.wait()  # held requests still complete (DISC: after the rest)
            self.writer.close()

    # --- handshake --------------------------------------------------------------------------
    def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self.writer.write(P.OPTION_REPLY.pack(P.OPT_REPLY_MAGIC, option, rtype, len(data)) + data)

    def _error(self, option: int, rtype: int, message: str) -> None:
        log.info("client %s: option %d refused: %s", self.peer, option, message)
        self._reply(option, rtype, message.encode())

    async def _handshake(self) -> bool:
        """Haggle options up to the export; False when the client aborted."""
        self.writer.write(
            P.SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        )
        (cflags,) = P.CLIENT_FLAGS.unpack(await self.reader.readexactly(4))
        if cflags & ~(P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & P.CLIENT_FLAG_NO_ZEROES)
        while True:
            magic, option, length = P.OPTION_HEADER.unpack(await self.reader.readexactly(16))
            if magic != P.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > P.MAX_OPTION_LENGTH:
                raise ProtocolError(f"option {option} with {length} bytes of data")
            data = await self.reader.readexactly(length)
            if option == P.OPT_ABORT:
                self._reply(option, P.REP_ACK)
                return False
            if option == P.OPT_EXPORT_NAME:
                if data.decode(errors="replace") not in ("", self.name):
                    raise ProtocolError(f"unknown export {data[:64]!r}")
                reply = P.EXPORT_NAME_REPLY.pack(self.router.size, self.router.flags)
                self.writer.write(reply if no_zeroes else reply + bytes(124))
                return True
            if option in (P.OPT_INFO, P.OPT_GO):
                if self._info(option, data) and option == P.OPT_GO:
                    return True
            elif option == P.OPT_LIST:
                if data:
                    self._error(option, P.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                else:
                    name = self.name.encode()
                    self._reply(option, P.REP_SERVER, P.U32.pack(len(name)) + name)
                    self._reply(option, P.REP_ACK)
            elif option == P.OPT_STARTTLS:
                self._error(option, P.REP_ERR_POLICY, "the router does not offer TLS")
            else:
                self._error(option, P.REP_ERR_UNSUP, f"option {option} is not supported")
            await self.writer.drain()

    def _info(self, option: int, data: bytes) -> bool:
        """Answer NBD_OPT_INFO/GO; True when the export was accepted."""
        if len(data) < 6:
            self._error(option, P.REP_ERR_INVALID, "option data too short")
            return False
        (name_len,) = P.U32.unpack_from(data)
        if name_len > len(data) - 6:
            self._error(option, P.REP_ERR_INVALID, "export name longer than the option data")
            return False
        (nreq,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * nreq:
            self._error(option, P.REP_ERR_INVALID, "information request list has the wrong size")
            return False
        name = data[4 : 4 + name_len].decode(errors="replace")
        if name not in ("", self.name):
            self._error(option, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return False
        r = self.router
        self._reply(option, P.REP_INFO, P.INFO_EXPORT_DATA.pack(P.INFO_EXPORT, r.size, r.flags))
        self._reply(
            option,
            P.REP_INFO,
            P.INFO_BLOCK_SIZE_DATA.pack(
                P.INFO_BLOCK_SIZE, P.MIN_BLOCK, P.PREFERRED_BLOCK, P.MAX_PAYLOAD
            ),
        )
        self._reply(option, P.REP_ACK)
        return True

    # --- transmission -----------------------------------------------------------------------
    async def _transmission(self) -> None:
        while True:
            await self.writer.drain()  # a client that does not read its replies is not read
            await self.slots.acquire()
            magic, flags, cmd, cookie, offset, length = P.REQUEST.unpack(
                await self.reader.readexactly(P.REQUEST.size)
            )
            if magic != P.REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            payload = b""
            if cmd == P.CMD_WRITE:
                if length > P.MAX_PAYLOAD:
                    raise ProtocolError(f"WRITE of {length} bytes exceeds {P.MAX_PAYLOAD}")
                payload = await self.reader.readexactly(length)
            if cmd == P.CMD_DISC:
                return
            self.outstanding += 1
            self.settled.clear()
            error = self._check(cmd, flags, offset, length)
            if error:
                self.router.errors += 1
                self._done(cookie, error, b"")
            else:
                done = functools.partial(self._done, cookie)
                self.router.submit(cmd, flags, offset, length, payload, done)

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """The error for a request the router refuses itself (0: forward it)."""
        r = self.router
        if cmd not in P.COMMAND_NAMES or cmd == P.CMD_BLOCK_STATUS:
            return P.EINVAL
        if flags & ~KNOWN_CMD_FLAGS:
            return P.EINVAL
        if flags & P.CMD_FLAG_FUA and not r.flags & P.TFLAG_SEND_FUA:
            return P.EINVAL
        if cmd in NEEDS_FLAG and not r.flags & NEEDS_FLAG[cmd]:
            return P.EINVAL
        if cmd in WRITING and r.flags & P.TFLAG_READ_ONLY:
            return P.EPERM
        if cmd == P.CMD_FLUSH:
            return P.EINVAL if offset or length else 0
        if cmd == P.CMD_READ and length > P.MAX_PAYLOAD:
            return P.EINVAL
        if offset + length > r.size:
            return P.ENOSPC if cmd in WRITING else P.EINVAL
        return 0

    def _done(self, cookie: int, error: int, data: bytes) -> None:
        """A request's reply, from whichever upstream answered it, back under its own cookie."""
        self.slots.release()
        self.outstanding -= 1
        if not self.outstanding:
            self.settled.set()
        if not self.writer.is_closing():
            self._send(cookie, error, data)

    def _send(self, cookie: int, error: int, data: bytes) -> None:
        self.out.write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, error, cookie), data)
