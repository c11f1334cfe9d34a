"""Frames over an asyncio stream: one reader and one writer per connection, both checking auth.

Reading verifies, in order: header crc (fatal: framing lost), payload length, HMAC tag, payload
crc (both NACKable: the frame is whole but its bytes are not the ones the sender wrote).

A busy receiver (the shadow's, for every frame of a stream) takes the connection over with a
FrameReader: the socket is read straight into its buffer (no StreamReader copies) and every
frame that arrived whole is split off at once, so reading a frame that is there already costs
no await, no task and no timer.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, replace

import crc32c

from shadowblk.delta.auth import Session
from shadowblk.delta.frames import (
    FLAG_HMAC,
    HEADER_SIZE,
    TAG_SIZE,
    ErrorCode,
    Frame,
    FrameError,
    decode_header,
    encode_header,
)


def encode(frame: Frame, session: Session) -> bytes:
    """The bytes of FRAME on the wire, tagged when the session has a key."""
    return b"".join(encode_parts(frame, session))


def encode_parts(frame: Frame, session: Session) -> tuple[bytes, ...]:
    """FRAME on the wire as (header, payload[, tag]): a sender hands the parts to its transport
    as they are, and the payload is not copied here only to be copied again there."""
    flags = frame.flags | (FLAG_HMAC if session.key is not None else 0)
    head = encode_header(frame, flags)
    if session.key is None:
        return head, frame.payload
    return head, frame.payload, session.tag(head, frame.payload)


@dataclass(frozen=True)
class RawFrame:
    """A frame as read, before its tag and payload crc are checked."""

    head: bytes
    frame: Frame  # without payload
    payload_crc: int
    payload: bytes
    tag: bytes


async def read_raw(reader: asyncio.StreamReader) -> RawFrame:
    """The next frame's bytes, header checked. EOF mid-frame raises IncompleteReadError."""
    head = await reader.readexactly(HEADER_SIZE)
    frame, plen, pcrc = decode_header(head)
    payload = await reader.readexactly(plen) if plen else b""
    tag = await reader.readexactly(TAG_SIZE) if frame.flags & FLAG_HMAC else b""
    return RawFrame(head, frame, pcrc, payload, tag)


def check(raw: RawFrame, session: Session) -> Frame:
    """The frame of RAW once its tag and payload crc passed (CPU-bound on big frames, and the
    hashes release the GIL: callers may run it in a worker thread)."""
    frame, payload = raw.frame, raw.payload
    if session.key is not None:
        if not frame.flags & FLAG_HMAC:
            raise FrameError(ErrorCode.AUTH, "frame without an HMAC tag; this peer requires one")
        if not session.verify(raw.head, payload, raw.tag):
            raise FrameError(
                ErrorCode.AUTH,
                f"bad HMAC on {frame.type.name} seq {frame.seq}",
                fatal=False,
                seq=frame.seq,
            )
    if crc32c.crc32c(payload) != raw.payload_crc:
        raise FrameError(
            ErrorCode.BAD_PAYLOAD,
            f"payload checksum mismatch on {frame.type.name} seq {frame.seq}",
            fatal=False,
            seq=frame.seq,
        )
    return replace(frame, payload=payload, flags=frame.flags & ~FLAG_HMAC)


async def read_frame(reader: asyncio.StreamReader, session: Session) -> Frame:
    """The next frame, every check passed. EOF mid-frame raises asyncio.IncompleteReadError."""
    return check(await read_raw(reader), session)


class FrameReader(asyncio.BufferedProtocol):
    """The receiving side of a connection, taken over from its StreamReader (see attach());
    the StreamWriter keeps writing: flow control and the connection's end are passed on to
    the stream's own protocol."""

    CHUNK = 1 << 20  # a fresh buffer of at least this size when the current one fills
    HIGH = 8 << 20  # bytes of whole frames waiting to be read at which the socket is paused

    def __init__(self, inner: asyncio.BaseProtocol, transport: asyncio.BaseTransport) -> None:
        self._inner = inner
        self._transport = transport
        self._buf = bytearray(self.CHUNK)
        self._start = 0  # first byte not yet split into a frame
        self._fill = 0  # end of the bytes received
        self._want = HEADER_SIZE  # bytes the next frame needs, once its header is known
        self._frames: collections.deque[RawFrame] = collections.deque()
        self._queued = 0
        self._paused = False
        self._end: BaseException | None = None  # EOF, a lost connection or a fatal header
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    def attach(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> FrameReader:
        """Receive the connection's next bytes (those READER holds already first) here."""
        transport = writer.transport
        frames = cls(transport.get_protocol(), transport)
        held = bytes(reader._buffer)  # private: the only way to take unread bytes over
        reader._buffer.clear()
        at_eof = reader._eof
        transport.set_protocol(frames)
        if held:
            frames._take(held)
        if at_eof:
            frames._finish(asyncio.IncompleteReadError(b"", HEADER_SIZE))
        transport.resume_reading()  # the StreamReader may have paused it
        return frames

    async def read(self, timeout: float) -> RawFrame:
        """The next frame's bytes, header checked; TimeoutError if it takes TIMEOUT seconds,
        IncompleteReadError at EOF (mid-frame or not), FrameError for a bad header."""
        if not self._frames:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout_at(loop.time() + timeout):
                while not self._frames:
                    if self._end is not None:
                        raise self._end
                    self._waiter = loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        raw = self._frames.popleft()
        self._queued -= HEADER_SIZE + len(raw.payload) + len(raw.tag)
        if self._paused and self._queued < self.HIGH // 2 and self._end is None:
            self._paused = False
            self._transport.resume_reading()
        return raw

    # --- asyncio.BufferedProtocol -------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buf) - self._fill < max(self._want - (self._fill - self._start), 4096):
            # too little room after the unsplit bytes: move them to the front (frames split
            # off earlier hold copies, never views, of the buffer), of a bigger buffer if the
            # next frame would not fit
            rest = self._buf[self._start : self._fill]
            if len(self._buf) < self._want + 4096:
                self._buf = bytearray(max(self.CHUNK, 2 * self._want))
            self._buf[: len(rest)] = rest
            self._start, self._fill = 0, len(rest)
        return memoryview(self._buf)[self._fill :]

    def buffer_updated(self, nbytes: int) -> None:
        self._fill += nbytes
        self._split()

    def _take(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self.get_buffer(len(view))
            n = min(len(room), len(view))
            room[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def _split(self) -> None:
        """Every whole frame received, off the buffer and onto the queue."""
        buf, pos, end = self._buf, self._start, self._fill
        while self._end is None and end - pos >= HEADER_SIZE:
            head = bytes(buf[pos : pos + HEADER_SIZE])
            try:
                frame, plen, pcrc = decode_header(head)
            except FrameError as exc:
                self._finish(exc)
                break
            tlen = TAG_SIZE if frame.flags & FLAG_HMAC else 0
            size = HEADER_SIZE + plen + tlen
            if end - pos < size:
                self._want = size
                break
            body = pos + HEADER_SIZE
            with memoryview(buf) as view:  # one copy of each, not a slice copied again
                payload = bytes(view[body : body + plen]) if plen else b""
                tag = bytes(view[body + plen : body + plen + tlen]) if tlen else b""
            self._frames.append(RawFrame(head, frame, pcrc, payload, tag))
            self._queued += size
            pos += size
            self._want = HEADER_SIZE
        self._start = pos
        if self._frames:
            self._wake()
        if self._queued >= self.HIGH and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def _finish(self, exc: BaseException) -> None:
        if self._end is None:
            self._end = exc
        if not self._paused:
            self._paused = True
            if not self._transport.is_closing():
                self._transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def eof_received(self) -> bool | None:
        partial = bytes(self._buf[self._start : self._fill])
        self._finish(asyncio.IncompleteReadError(partial, self._want))
        return self._inner.eof_received()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or asyncio.IncompleteReadError(b"", self._want))
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
