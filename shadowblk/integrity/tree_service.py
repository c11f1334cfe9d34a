"""The shadow's verify port: answers tree-compare messages about the volumes in its data folder,
so a primary can check a shadow over the network by exchanging hash-tree nodes, not data.

A separate listener from the delta streams (`shadowblk shadow --verify-listen`), on the same
event loop and with the same authentication. It only reads: OPEN takes a snapshot of the
volume's checksum map (DIR/<volume>.map, kept by the applier) and builds its hash tree in a
worker thread, so delta streams on the loop keep flowing; HELLO and CHILDREN are answered from
that snapshot until the next OPEN. A bad peer gets a clear refusal or error and is cut off;
nothing it sends can touch a volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from pathlib import Path

from shadowblk.delta.frames import NONCE_SIZE
from shadowblk.delta.volume_state import VOLUME_ID
from shadowblk.integrity.checksum_map import LiveMap, MapInvalidError
from shadowblk.integrity.hash_tree import HashTree
from shadowblk.integrity.tree_compare import ERROR, TreeResponder
from shadowblk.integrity.tree_wire import (
    FLAG_TAGGED,
    GREETING,
    HEADER,
    MAX_REQUEST,
    OPEN,
    OPEN_REPLY,
    REPLY,
    Channel,
    WireError,
    pack_greeting,
    pack_refusal,
    unpack_greeting,
)

log = logging.getLogger(__name__)

GREETING_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
MAX_CONNECTIONS = 16


class TreeService:
    """Answers verify connections for the volumes of DATA_DIR."""

    def __init__(self, data_dir: Path, key: bytes | None, tls: ssl.SSLContext | None) -> None:
        if key is None and tls is None:
            raise ValueError("the verify port needs the shared key or TLS, like the delta port")
        self.data_dir = data_dir
        self.key = key
        self.tls = tls
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self.connections += 1
        try:
            if self.connections > MAX_CONNECTIONS:
                writer.write(pack_refusal(f"busy: {MAX_CONNECTIONS} verify connections open"))
                await writer.drain()
                return
            await self._serve(reader, writer, peer)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
            log.info("verify connection from %s ended: %s", peer, exc or type(exc).__name__)
        except Exception as exc:  # the shadow outlives any one peer
            log.exception("verify connection from %s failed: %s", peer, exc)
        finally:
            self.connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        raw = await asyncio.wait_for(reader.readexactly(GREETING.size), GREETING_TIMEOUT)
        try:
            hello = unpack_greeting(raw)
            self._check_flags(hello.flags)
        except WireError as exc:
            log.warning("refusing verify connection from %s: %s", peer, exc)
            writer.write(pack_refusal(str(exc)))
            await writer.drain()
            return
        nonce = os.urandom(NONCE_SIZE)
        writer.write(pack_greeting(nonce, self.key is not None))
        channel = Channel(self.key, hello.nonce, nonce, sends=REPLY)
        responder: TreeResponder | None = None
        while True:
            try:
                header = await asyncio.wait_for(reader.readexactly(HEADER.size), IDLE_TIMEOUT)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                return  # the asker hung up between frames: the normal end
            try:
                length = channel.payload_length(header, MAX_REQUEST)
                body = await reader.readexactly(length + channel.tag_size)
                request = channel.accept(header, body[:length], body[length:])
            except WireError as exc:
                log.warning("verify connection from %s: %s", peer, exc)
                writer.write(channel.pack(bytes([ERROR]) + str(exc).encode()))
                await writer.drain()
                return
            if request[:1] == bytes([OPEN]):
                reply, snapshot = await asyncio.to_thread(self._open, request[1:])
                responder = snapshot or responder
            elif responder is None:
                reply = bytes([ERROR]) + b"OPEN a volume first"
            else:
                reply = await asyncio.to_thread(responder.handle, request)
            writer.write(channel.pack(reply))
            await writer.drain()

    def _check_flags(self, flags: int) -> None:
        if self.key is not None and not flags & FLAG_TAGGED:
            raise WireError("this shadow requires frames tagged with the shared key")
        if self.key is None and flags & FLAG_TAGGED:
            raise WireError("this shadow has no shared key: connect with TLS only")

    def _open(self, raw_id: bytes) -> tuple[bytes, TreeResponder | None]:
        """Snapshot a volume's map: (OPEN reply or error reply, its responder)."""
        volume = raw_id.decode(errors="replace")
        if not VOLUME_ID.match(volume):
            return bytes([ERROR]) + f"bad volume id {volume!r}".encode(), None
        try:
            live = LiveMap(self.data_dir / f"{volume}.map")
        except MapInvalidError as exc:
            return bytes([ERROR]) + f"no usable checksum map for {volume}: {exc}".encode(), None
        responder = TreeResponder(HashTree(live.crcs, live.block_size))
        return bytes([OPEN]) + OPEN_REPLY.pack(live.epoch, live.clean), responder


async def start(service: TreeService, host: str, port: int) -> asyncio.Server:
    """Listen for verify connections (TLS when the service has a context)."""
    return await asyncio.start_server(service.handle, host, port, ssl=service.tls)
