"""Ships one volume to one shadow: connect, agree where the shadow stands, catch it up, stream.

Runs on the replicator's event loop. Frames in flight are kept (encoded) until the shadow
confirms them (STAGED or EPOCH_APPLIED); a NACK sends everything again from the NACKed sequence
(go-back-N). Any other trouble drops the connection; the next one starts from what the shadow
has durably applied, from memory if the epochs are still there, else from the lacks bitmap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import zstandard

from shadowblk.delta.auth import Session
from shadowblk.delta.epoch import Change, Epoch
from shadowblk.delta.frames import (
    FLAG_MERGE,
    NONCE_SIZE,
    ErrorCode,
    Frame,
    FrameError,
    FrameType,
    Hello,
    pack_hello,
    unpack_error,
    unpack_nack,
    unpack_welcome,
)
from shadowblk.delta.primary_state import ShadowRecord, shadow_name
from shadowblk.delta.sources import full_sync, resync
from shadowblk.delta.stream import FrameReader, check, encode, encode_parts, read_frame

if TYPE_CHECKING:
    from shadowblk.delta.replicator import Replicator

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
ACK_TIMEOUT = 10.0  # no frame at all from the shadow this long: the link is dead
PING_INTERVAL = 2.0
WINDOW_BYTES = 32 << 20
INLINE_BYTES = 64 << 10  # epochs this small are encoded on the event loop
BATCH_BYTES = 4 << 20  # frames made per worker-thread call
SEND_BUFFER = 8 << 20  # frames queued in the transport before drain() waits: keeps TCP busy

Wire = tuple[bytes, ...]  # a frame's bytes on the wire, in parts (see encode_parts)


class ShadowRefused(Exception):
    """The shadow sent ERROR: it will not take this stream as it is."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"shadow refused ({_code_name(code)}): {reason}")
        self.code = code


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


class ShadowLink:
    """The primary's side of one shadow. Fields marked (lock) are shared with writer threads."""

    def __init__(self, rep: Replicator, host: str, port: int) -> None:
        self.rep = rep
        self.host, self.port = host, port
        self.name = f"{host}:{port}"
        self.record = ShadowRecord(rep.state_dir, shadow_name(host, port), rep.size, rep.block_size)
        self.retained_from: int | None = None  # (lock) epochs >= this are kept for this shadow
        self.connected = False
        self.in_sync = False  # (lock) streaming from memory: flushes wait for this shadow
        self.fenced = False
        self.phase = "connecting"
        self.catch_up = ""  # how the last connection started: streaming, resync or full-sync
        self.last_error = ""
        self.nacks = 0
        self.reconnects = 0
        self.handshakes_done = 0
        self.sent_bytes = 0
        self.sync_total = 0
        self.sync_done = [0]
        self.samples: list[tuple[float, int]] = []
        self.kick = asyncio.Event()

    # --- the connection loop ----------------------------------------------------------------

    async def run(self) -> None:
        delay = 0.05
        while not self.rep.closing:
            started = time.monotonic()
            try:
                await self._connect()
            except ShadowRefused as exc:
                self.last_error = str(exc)
                if exc.code == ErrorCode.STALE_GENERATION:
                    self.fenced = True
                    self.phase = "fenced"
                    log.error("%s: %s; this primary is fenced", self.name, exc)
                    self.rep.on_fenced(self)
                    return
                log.warning("%s: %s", self.name, exc)
            except (
                OSError,
                EOFError,
                asyncio.IncompleteReadError,
                FrameError,
                TimeoutError,
            ) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.info("%s: connection lost: %s", self.name, self.last_error)
            except Exception as exc:  # e.g. a frame failed to build: retried, never a silent stop
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: shipping failed; reconnecting", self.name)
            finally:
                self.rep.on_disconnect(self)
            if self.handshakes_done or time.monotonic() - started > 5:
                delay = 0.05  # the shadow was reachable: try again at once
            self.handshakes_done = 0
            self.phase = "connecting"
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _connect(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.rep.tls), CONNECT_TIMEOUT
        )
        try:
            await _Session(self, reader, writer).run()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    def sent(self, nbytes: int) -> None:
        self.sent_bytes += nbytes
        now = time.monotonic()
        self.samples.append((now, self.sent_bytes))
        while len(self.samples) > 2 and self.samples[0][0] < now - 5:
            self.samples.pop(0)

    def throughput(self) -> float:
        """Bytes per second on the wire over the last few seconds."""
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        if time.monotonic() - t1 > 5:
            return 0.0
        return (b1 - b0) / max(t1 - t0, 1e-3)


class _Session:
    """One connection's worth of shipping."""

    def __init__(
        self, link: ShadowLink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.link = link
        self.rep = link.rep
        self.reader = reader
        self.writer = writer
        self.session = Session(self.rep.key, bytes(NONCE_SIZE))
        self.seq = 0
        self.unconfirmed: list[tuple[int, Wire]] = []  # (seq, wire parts), seqs contiguous
        self.unconfirmed_bytes = 0
        self.pos = 0
        self.rewind_to: int | None = None
        self.end_seq: dict[int, int] = {}  # committing EPOCH_END epoch -> its seq
        self.source: Iterator[Change] | None = None
        self.tag_epoch = 0  # epoch number the source's changes are staged under
        self.sent_epoch = 0
        self.current: Iterator[Change] | None = None
        self.current_epoch: Epoch | None = None
        self.fuzzy_until = 0  # epochs below this end with FLAG_MERGE
        self.last_sent = time.monotonic()
        self.progress_logged = 0
        # per connection, not per link: a frame still being made in a worker thread for a
        # dropped connection must not share a compressor (not thread-safe) with the next one
        self.compressor = zstandard.ZstdCompressor(level=self.rep.level)

    def frame(self, ftype: FrameType, epoch: int = 0, **kw) -> Frame:
        return Frame(ftype, self.rep.vol_key, self.rep.generation, epoch, **kw)

    async def run(self) -> None:
        await self._handshake()
        self.writer.transport.set_write_buffer_limits(high=SEND_BUFFER)
        self.frames = FrameReader.attach(self.reader, self.writer)
        acks = asyncio.ensure_future(self._acks())
        pump = asyncio.ensure_future(self._pump())
        try:
            done, _ = await asyncio.wait({acks, pump}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in (acks, pump):
                task.cancel()
            await asyncio.gather(acks, pump, return_exceptions=True)

    async def _handshake(self) -> None:
        link, rep = self.link, self.rep
        nonce = os.urandom(NONCE_SIZE)
        hello = Hello(
            rep.volume_id, rep.size, rep.block_size, rep.generation, link.record.acked, nonce
        )
        self.writer.write(
            encode(self.frame(FrameType.HELLO, payload=pack_hello(hello)), self.session)
        )
        self.session = Session(rep.key, nonce)
        reply = await asyncio.wait_for(read_frame(self.reader, self.session), CONNECT_TIMEOUT)
        if reply.type is FrameType.ERROR:
            raise ShadowRefused(*unpack_error(reply.payload))
        if reply.type is not FrameType.WELCOME:
            raise FrameError(ErrorCode.PROTOCOL, f"expected WELCOME, got {reply.type.name}")
        welcome = unpack_welcome(reply.payload)
        if welcome.generation > rep.generation:
            raise ShadowRefused(
                ErrorCode.STALE_GENERATION, f"shadow is at generation {welcome.generation}"
            )
        self.session = Session(rep.key, nonce, welcome.nonce)
        plan = await asyncio.to_thread(
            rep.plan_between_writes, link, welcome.known, welcome.last_applied
        )
        link.handshakes_done += 1
        log.info("%s: shadow at epoch %d, plan %s", link.name, welcome.last_applied, plan.kind)
        link.phase = link.catch_up = plan.kind
        self.sent_epoch = plan.start_after
        self.tag_epoch = plan.start_after + 1
        if plan.kind == "full-sync":
            link.sync_total, link.sync_done = rep.size, [0]
            self.source = full_sync(
                rep.fd, rep.size, rep.block_size, self.compressor, link.sync_done
            )
        elif plan.kind == "resync":
            assert plan.lacks is not None
            link.sync_total, link.sync_done = plan.lacks.count() * rep.block_size, [0]
            self.source = resync(rep.fd, plan.lacks, self.compressor, link.sync_done)

    # --- sending ----------------------------------------------------------------------------

    async def _pump(self) -> None:
        while True:
            self.link.kick.clear()
            if self.rewind_to is not None:
                self.pos = self.rewind_to - self.unconfirmed[0][0] if self.unconfirmed else 0
                self.rewind_to = None
            if self.pos < len(self.unconfirmed):
                await self._write(list(self.unconfirmed[self.pos][1]))
                self.pos += 1
                continue
            if self.unconfirmed_bytes > WINDOW_BYTES:
                await self._wait(1.0)
                continue
            # reading, compressing and tagging release the GIL: in a worker thread they overlap
            # with this loop pushing the previous frames into the socket; the frames of a small
            # epoch are made here, sparing a sync flush two thread hops
            if self._small():
                made = self._produce(0)
            else:
                made = await asyncio.to_thread(self._produce, BATCH_BYTES)
            if not made:
                if time.monotonic() - self.last_sent < PING_INTERVAL:
                    await self._wait(PING_INTERVAL)
                    continue
                frame = self.frame(FrameType.PING, seq=self.seq + 1)
                made = [(frame, encode_parts(frame, self.session))]
            for frame, wire in made:
                self.seq += 1
                if frame.type is FrameType.EPOCH_END and not frame.flags & FLAG_MERGE:
                    self.end_seq[frame.epoch] = self.seq
                self.unconfirmed.append((self.seq, wire))
                self.unconfirmed_bytes += _size(wire)
                self.pos += 1
            await self._write([part for _, wire in made for part in wire])

    def _produce(self, budget: int) -> list[tuple[Frame, Wire]]:
        """The next frames, sequenced, and their wire bytes: at least one if there is anything
        to send, more while they add up to less than BUDGET bytes (one thread hop for many)."""
        made: list[tuple[Frame, Wire]] = []
        size = 0
        while not made or size < budget:
            frame = self._next()
            if frame is None:
                break
            frame = replace(frame, seq=self.seq + 1 + len(made))
            wire = encode_parts(frame, self.session)
            made.append((frame, wire))
            size += _size(wire)
        return made

    def _small(self) -> bool:
        """The next frame comes from an epoch of at most INLINE_BYTES of data (or none)."""
        if self.source is not None:
            return False
        if self.current is not None:
            epoch = self.current_epoch
        else:
            epoch = self.rep.epoch_after(self.sent_epoch)
        return epoch is None or epoch.nbytes <= INLINE_BYTES

    async def _wait(self, timeout: float) -> None:
        """Until kicked (a cut, an ack, a NACK) or TIMEOUT passes."""
        timer = asyncio.get_running_loop().call_later(timeout, self.link.kick.set)
        try:
            await self.link.kick.wait()
        finally:
            timer.cancel()

    async def _write(self, parts: list[bytes]) -> None:
        """Send PARTS (frames' wire parts) in order, then wait for room: the transport sends
        each at once or copies it into its buffer, never both (no joined copy first)."""
        for part in parts:
            self.writer.write(part)
        await self.writer.drain()
        self.last_sent = time.monotonic()
        self.link.sent(sum(len(part) for part in parts))

    def _next(self) -> Frame | None:
        """The next frame to send, or None when there is nothing to send right now."""
        if self.source is not None:
            change = next(self.source, None)
            if change is not None:
                self._progress()
                return self._change(change, self.tag_epoch)
            self.source = None
            self.fuzzy_until = self.rep.end_of_fuzzy()
            log.info("%s: sync read done; consistent at epoch %d", self.link.name, self.fuzzy_until)
        if self.current is not None:
            assert self.current_epoch is not None
            change = next(self.current, None)
            number = self.current_epoch.number
            if change is not None:
                return self._change(change, number)
            self.current = None
            self.sent_epoch = number
            flags = FLAG_MERGE if number < self.fuzzy_until else 0
            return self.frame(FrameType.EPOCH_END, number, flags=flags)
        epoch = self.rep.epoch_after(self.sent_epoch)
        if epoch is None:
            return None
        self.current_epoch = epoch
        self.current = epoch.changes(self.rep.level)
        return self._next()

    def _progress(self) -> None:
        """Log every tenth of a sync read (status() has the exact figures)."""
        link = self.link
        tenth = link.sync_done[0] * 10 // max(link.sync_total, 1)
        if tenth > self.progress_logged:
            self.progress_logged = tenth
            log.info(
                "%s: %s %d%% (%d of %d MiB)",
                link.name,
                link.phase,
                tenth * 10,
                link.sync_done[0] >> 20,
                link.sync_total >> 20,
            )

    def _change(self, change: Change, epoch: int) -> Frame:
        return self.frame(
            change.type,
            epoch,
            offset=change.offset,
            length=change.length,
            payload=change.payload,
            flags=change.flags,
        )

    # --- receiving --------------------------------------------------------------------------

    async def _acks(self) -> None:
        while True:
            frame = check(await self.frames.read(ACK_TIMEOUT), self.session)
            if frame.type is FrameType.EPOCH_APPLIED:
                seq = self.end_seq.get(frame.epoch)
                if seq is None:
                    raise FrameError(ErrorCode.PROTOCOL, f"ack of epoch {frame.epoch} never sent")
                self._confirm(seq)
                for epoch in [e for e in self.end_seq if e <= frame.epoch]:
                    del self.end_seq[epoch]
                if frame.epoch >= self.fuzzy_until and self.link.phase != "streaming":
                    self.link.phase = "streaming"
                    log.info("%s: in sync at epoch %d", self.link.name, frame.epoch)
                self.rep.on_acked(self.link, frame.epoch, frame.epoch >= self.fuzzy_until)
            elif frame.type is FrameType.STAGED:
                self._confirm(frame.offset)
            elif frame.type is FrameType.NACK:
                seq, code, reason = unpack_nack(frame.payload)
                if not self.unconfirmed or not (
                    self.unconfirmed[0][0] <= seq <= self.unconfirmed[-1][0]
                ):
                    raise FrameError(ErrorCode.PROTOCOL, f"NACK of seq {seq} not in flight")
                self.link.nacks += 1
                log.warning(
                    "%s: NACK seq %d (%s): %s", self.link.name, seq, _code_name(code), reason
                )
                self.rewind_to = seq
            elif frame.type is FrameType.ERROR:
                raise ShadowRefused(*unpack_error(frame.payload))
            elif frame.type is not FrameType.PONG:
                raise FrameError(ErrorCode.PROTOCOL, f"unexpected {frame.type.name} from a shadow")
            self.link.kick.set()

    def _confirm(self, seq: int) -> None:
        """The shadow holds every frame up to SEQ: forget them."""
        drop = 0
        while drop < len(self.unconfirmed) and self.unconfirmed[drop][0] <= seq:
            self.unconfirmed_bytes -= _size(self.unconfirmed[drop][1])
            drop += 1
        del self.unconfirmed[:drop]
        self.pos = max(0, self.pos - drop)
        if self.rewind_to is not None and self.rewind_to <= seq:
            self.rewind_to = None


def _size(wire: Wire) -> int:
    return sum(len(part) for part in wire)
