"""The handshake phase: fixed newstyle greeting and option haggling, up to the chosen export.

`negotiate` returns a Session for the transmission phase, or None when the client aborted.
Anything that breaks a MUST of the protocol raises HandshakeError: the caller hard-disconnects
that client alone.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from shadowblk.nbd import protocol as P
from shadowblk.nbd.backend import Backend
from shadowblk.nbd.wire import Disconnected, Wire

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0


class HandshakeError(Exception):
    """The client broke the protocol during the handshake: hard disconnect."""


@dataclass
class Export:
    """What the server offers: one named volume."""

    name: str
    backend: Backend
    description: str = ""
    preferred_block: int = P.PREFERRED_BLOCK
    max_payload: int = P.MAX_PAYLOAD

    def transmission_flags(self, structured: bool) -> int:
        flags = P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_CACHE
        # one file descriptor and the kernel page cache are shared by every connection, and a
        # flush syncs the whole file: FLUSH/FUA on one connection covers writes on all
        flags |= P.TFLAG_CAN_MULTI_CONN
        if self.backend.read_only:
            flags |= P.TFLAG_READ_ONLY
        else:
            flags |= P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES | P.TFLAG_SEND_FAST_ZERO
        if structured:
            flags |= P.TFLAG_SEND_DF
        return flags


@dataclass
class Session:
    """The outcome of a handshake: what the transmission phase needs."""

    wire: Wire
    export: Export
    structured: bool
    meta_contexts: dict[int, str] = field(default_factory=dict)

    @property
    def flags(self) -> int:
        return self.export.transmission_flags(self.structured)


class _Haggle:
    """Per-connection negotiation state."""

    def __init__(
        self,
        wire: Wire,
        export: Export,
        tls: ssl.SSLContext | None,
        shutting_down: Callable[[], bool],
    ) -> None:
        self.wire = wire
        self.export = export
        self.tls = tls
        self.shutting_down = shutting_down
        self.no_zeroes = False
        self._reset()

    def _reset(self) -> None:
        """State that STARTTLS must forget."""
        self.structured = False
        self.meta: dict[int, str] = {}

    # --- replies ---
    def reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self.wire.send(P.OPTION_REPLY.pack(P.OPT_REPLY_MAGIC, option, rtype, len(data)) + data)

    def error(self, option: int, rtype: int, message: str) -> None:
        log.info("option %d refused (%#x): %s", option, rtype, message)
        self.reply(option, rtype, message.encode()[: P.MAX_STRING])

    # --- the loop ---
    def run(self) -> Session | None:
        while True:
            magic, option, length = P.OPTION_HEADER.unpack(
                self.wire.recv_exact(P.OPTION_HEADER.size)
            )
            if magic != P.IHAVEOPT:
                raise HandshakeError(f"bad option magic {magic:#x}")
            if length > P.MAX_OPTION_LENGTH:
                raise HandshakeError(f"option {option} with {length} bytes of data")
            data = self.wire.recv_exact(length)
            secure = self.tls is None or self.wire.is_tls
            if option == P.OPT_ABORT:
                self.reply(option, P.REP_ACK)
                return None
            if option == P.OPT_EXPORT_NAME:
                if not secure:
                    raise HandshakeError("NBD_OPT_EXPORT_NAME before STARTTLS")
                return self._export_name(data)
            if self.shutting_down():
                self.error(option, P.REP_ERR_SHUTDOWN, "server shutting down")
            elif not secure and option != P.OPT_STARTTLS:
                self.error(option, P.REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
            elif option == P.OPT_STARTTLS:
                self._starttls(option, data)
            elif option == P.OPT_LIST:
                self._list(option, data)
            elif option in (P.OPT_INFO, P.OPT_GO):
                session = self._info_go(option, data)
                if session is not None:
                    return session
            elif option == P.OPT_STRUCTURED_REPLY:
                if data:
                    self.error(option, P.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                elif self.structured:
                    self.error(option, P.REP_ERR_INVALID, "structured replies already on")
                else:
                    self.structured = True
                    self.reply(option, P.REP_ACK)
            elif option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                self._meta_context(option, data)
            else:
                self.error(option, P.REP_ERR_UNSUP, f"option {option} is not supported")

    def _export_name(self, data: bytes) -> Session:
        name = data.decode(errors="replace")
        if name not in ("", self.export.name):
            raise HandshakeError(f"unknown export {name!r} asked with NBD_OPT_EXPORT_NAME")
        flags = self.export.transmission_flags(self.structured)
        reply = P.EXPORT_NAME_REPLY.pack(self.export.backend.size, flags)
        self.wire.send(reply if self.no_zeroes else reply + bytes(124))
        return self._session(name)

    def _session(self, name: str) -> Session:
        # one export: "" and its name are the same one, and SET_META_CONTEXT only succeeds for it
        return Session(self.wire, self.export, self.structured, dict(self.meta))

    def _starttls(self, option: int, data: bytes) -> None:
        if self.tls is None:
            self.error(option, P.REP_ERR_POLICY, "this server does not offer TLS")
        elif self.wire.is_tls:
            self.error(option, P.REP_ERR_INVALID, "TLS is already on")
        elif data:
            self.error(option, P.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        else:
            self.reply(option, P.REP_ACK)
            try:
                self.wire.sock = self.tls.wrap_socket(self.wire.sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                raise HandshakeError(f"TLS handshake failed: {exc}") from None
            self._reset()

    def _list(self, option: int, data: bytes) -> None:
        if data:
            self.error(option, P.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        name = self.export.name.encode()
        self.reply(option, P.REP_SERVER, P.U32.pack(len(name)) + name)
        self.reply(option, P.REP_ACK)

    def _info_go(self, option: int, data: bytes) -> Session | None:
        if len(data) < 6:
            self.error(option, P.REP_ERR_INVALID, "option data too short")
            return None
        (name_len,) = P.U32.unpack_from(data)
        if name_len > len(data) - 6:
            self.error(option, P.REP_ERR_INVALID, "export name longer than the option data")
            return None
        raw_name = data[4 : 4 + name_len]
        (nreq,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * nreq:
            self.error(option, P.REP_ERR_INVALID, "information request list has the wrong size")
            return None
        requests = set(struct.unpack_from(f">{nreq}H", data, 6 + name_len))
        name = raw_name.decode(errors="replace")
        if name not in ("", self.export.name):
            self.error(option, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        export = self.export
        flags = export.transmission_flags(self.structured)
        self.reply(
            option, P.REP_INFO, P.INFO_EXPORT_DATA.pack(P.INFO_EXPORT, export.backend.size, flags)
        )
        self.reply(
            option,
            P.REP_INFO,
            P.INFO_BLOCK_SIZE_DATA.pack(
                P.INFO_BLOCK_SIZE, P.MIN_BLOCK, export.preferred_block, export.max_payload
            ),
        )
        if P.INFO_NAME in requests:
            self.reply(option, P.REP_INFO, struct.pack(">H", P.INFO_NAME) + export.name.encode())
        if P.INFO_DESCRIPTION in requests and export.description:
            self.reply(
                option,
                P.REP_INFO,
                struct.pack(">H", P.INFO_DESCRIPTION) + export.description.encode(),
            )
        self.reply(option, P.REP_ACK)
        return self._session(name) if option == P.OPT_GO else None

    def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == P.OPT_SET_META_CONTEXT
        if setting:
            self.meta = {}  # replaced even when the option fails
            if not self.structured:
                self.error(option, P.REP_ERR_INVALID, "negotiate structured replies first")
                return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self.error(option, P.REP_ERR_INVALID, "malformed metadata context request")
            return
        name, queries = parsed
        if name not in ("", self.export.name):
            self.error(option, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if any(":" not in q for q in queries):
            self.error(option, P.REP_ERR_INVALID, "a query lacks its 'namespace:' prefix")
            return
        if setting:
            chosen = P.META_BASE_ALLOCATION in queries
        else:
            chosen = not queries or any(q in ("base:", P.META_BASE_ALLOCATION) for q in queries)
        if chosen:
            context_id = P.META_ALLOCATION_ID if setting else 0
            self.reply(
                option,
                P.REP_META_CONTEXT,
                P.U32.pack(context_id) + P.META_BASE_ALLOCATION.encode(),
            )
            if setting:
                self.meta = {P.META_ALLOCATION_ID: P.META_BASE_ALLOCATION}
        self.reply(option, P.REP_ACK)


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """(export name, queries) of a LIST/SET_META_CONTEXT request; None if it is malformed."""
    try:
        pos = 0
        (name_len,) = P.U32.unpack_from(data, pos)
        pos += 4
        if name_len > P.MAX_STRING or pos + name_len > len(data):
            return None
        name = data[pos : pos + name_len].decode()
        pos += name_len
        (count,) = P.U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (qlen,) = P.U32.unpack_from(data, pos)
            pos += 4
            if qlen > P.MAX_STRING or pos + qlen > len(data):
                return None
            queries.append(data[pos : pos + qlen].decode())
            pos += qlen
        return (name, queries) if pos == len(data) else None
    except (struct.error, UnicodeDecodeError):
        return None


def negotiate(
    sock: socket.socket,
    export: Export,
    tls: ssl.SSLContext | None,
    shutting_down: Callable[[], bool],
) -> Session | None:
    """Run the handshake on a fresh connection. None: the client aborted politely."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    wire = Wire(sock)
    try:
        wire.send(
            P.SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        )
        (client_flags,) = P.CLIENT_FLAGS.unpack(wire.recv_exact(P.CLIENT_FLAGS.size))
        known = P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES
        if client_flags & ~known:
            raise HandshakeError(f"unknown client flags {client_flags:#x}")
        if tls is not None and not client_flags & P.CLIENT_FLAG_FIXED_NEWSTYLE:
            raise HandshakeError("TLS needs fixed newstyle, which the client did not offer")
        haggle = _Haggle(wire, export, tls, shutting_down)
        haggle.no_zeroes = bool(client_flags & P.CLIENT_FLAG_NO_ZEROES)
        session = haggle.run()
    except TimeoutError:
        raise HandshakeError("handshake timed out") from None
    except Disconnected as exc:
        raise HandshakeError(f"client went away during the handshake: {exc}") from None
    sock = wire.sock
    sock.settimeout(None)
    return session
