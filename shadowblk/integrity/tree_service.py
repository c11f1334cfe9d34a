"""The shadow's verify port: answers tree-compare messages about the volumes in its data folder,
so a primary can check a shadow over the network by exchanging hash-tree nodes, not data.

A separate listener from the delta streams (`shadowblk shadow --verify-listen`), on the same
event loop and with the same authentication. It only reads: OPEN takes a snapshot of the
volume's checksum map (DIR/<volume>.map, kept by the applier) and builds its hash tree in a
worker thread, so delta streams on the loop keep flowing; HELLO and CHILDREN are answered from
that snapshot until the next OPEN. For a primary's live scrub it also answers READ (blocks for
read-repair, each checked against the map first) and SCAN (the image checked against its map:
the blocks that rotted here), in a worker thread too. A bad peer gets a clear refusal or error
and is cut off; nothing it sends can touch a volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shadowblk.delta.frames import NONCE_SIZE
from shadowblk.delta.volume_state import VOLUME_ID
from shadowblk.integrity.checksum_map import LiveMap, MapInvalidError
from shadowblk.integrity.hash_tree import HashTree
from shadowblk.integrity.shadow_blocks import BlockError, ShadowBlocks
from shadowblk.integrity.tree_compare import ERROR, TreeResponder
from shadowblk.integrity.tree_wire import (
    FLAG_TAGGED,
    GREETING,
    HEADER,
    MAX_REQUEST,
    MAX_SCAN_ENTRIES,
    OPEN,
    OPEN_REPLY,
    READ,
    READ_REQUEST,
    REPLY,
    SCAN,
    SCAN_ENTRY,
    SCAN_REPLY,
    SCAN_REQUEST,
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

    def __init__(
        self,
        data_dir: Path,
        key: bytes | None,
        tls: ssl.SSLContext | None,
        devices: dict[str, Path] | None = None,
    ) -> None:
        if key is None and tls is None:
            raise ValueError("the verify port needs the shared key or TLS, like the delta port")
        self.data_dir = data_dir
        self.devices = devices or {}  # volume id -> the operator's device for its image
        self.key = key
        self.tls = tls
        self.connections = 0
        # its own threads, not the loop's default pool the applier commits in: a long SCAN
        # or tree build must never hold up a sync epoch; and one SCAN (a whole-image read)
        # at a time
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="verify")
        self.scans = asyncio.Semaphore(1)

    async def _work(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args))

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
        blocks: ShadowBlocks | None = None
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
                reply, snapshot, opened = await self._work(self._open, request[1:])
                responder, blocks = snapshot or responder, opened or blocks
            elif responder is None or blocks is None:
                reply = bytes([ERROR]) + b"OPEN a volume first"
            elif request[:1] == bytes([SCAN]):
                async with self.scans:
                    reply = await self._work(_blocks_request, blocks, request)
            elif request[:1] == bytes([READ]):
                reply = await self._work(_blocks_request, blocks, request)
            else:
                reply = await self._work(responder.handle, request)
            writer.write(channel.pack(reply))
            await writer.drain()

    def _check_flags(self, flags: int) -> None:
        if self.key is not None and not flags & FLAG_TAGGED:
            raise WireError("this shadow requires frames tagged with the shared key")
        if self.key is None and flags & FLAG_TAGGED:
            raise WireError("this shadow has no shared key: connect with TLS only")

    def _open(self, raw_id: bytes) -> tuple[bytes, TreeResponder | None, ShadowBlocks | None]:
        """Snapshot a volume's map: (OPEN reply or error reply, its responder, its blocks)."""
        volume = raw_id.decode(errors="replace")
        if not VOLUME_ID.match(volume):
            return bytes([ERROR]) + f"bad volume id {volume!r}".encode(), None, None
        try:
            live = LiveMap(self.data_dir / f"{volume}.map")
        except MapInvalidError as exc:
            reply = bytes([ERROR]) + f"no usable checksum map for {volume}: {exc}".encode()
            return reply, None, None
        responder = TreeResponder(HashTree(live.crcs, live.block_size))
        image = self.devices.get(volume, self.data_dir / f"{volume}.img")
        reply = bytes([OPEN]) + OPEN_REPLY.pack(live.epoch, live.clean)
        return reply, responder, ShadowBlocks(image, live)


def _blocks_request(blocks: ShadowBlocks, request: bytes) -> bytes:
    """READ or SCAN of the opened volume: the reply, or an error reply saying why not."""
    try:
        if request[0] == READ:
            if len(request) != 1 + READ_REQUEST.size:
                raise BlockError(f"READ of {len(request)} bytes, expected {1 + READ_REQUEST.size}")
            offset, length = READ_REQUEST.unpack_from(request, 1)
            return bytes([READ]) + blocks.read(offset, length)
        if len(request) != 1 + SCAN_REQUEST.size:
            raise BlockError(f"SCAN of {len(request)} bytes, expected {1 + SCAN_REQUEST.size}")
        (rate,) = SCAN_REQUEST.unpack_from(request, 1)
        found, complete = blocks.scan(rate, MAX_SCAN_ENTRIES)
    except (BlockError, OSError) as exc:
        return bytes([ERROR]) + str(exc).encode()
    entries = b"".join(SCAN_ENTRY.pack(*entry) for entry in found)
    return bytes([SCAN]) + SCAN_REPLY.pack(complete, len(found)) + entries


async def start(service: TreeService, host: str, port: int) -> asyncio.Server:
    """Listen for verify connections (TLS when the service has a context)."""
    return await asyncio.start_server(service.handle, host, port, ssl=service.tls)
