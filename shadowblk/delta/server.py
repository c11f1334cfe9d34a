"""The shadow server: accepts delta streams, one per volume at a time, and applies them.

One asyncio loop; per stream a receiving task checks frames while an applying task stages
them and commits epochs (fsyncs and the apply in a worker thread, so other volumes and the next
epoch keep streaming). A bad peer gets an ERROR
frame (or a NACK for a frame whose bytes are damaged) and never touches a volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path

import zstandard

from shadowblk.delta.applier import ShadowVolume
from shadowblk.delta.auth import Session
from shadowblk.delta.extents import check_range, decode_extent
from shadowblk.delta.frames import (
    FLAG_MERGE,
    MAX_EXTENT,
    NONCE_SIZE,
    ErrorCode,
    Frame,
    FrameError,
    FrameType,
    Hello,
    Welcome,
    pack_error,
    pack_nack,
    pack_welcome,
    unpack_hello,
    volume_key,
)
from shadowblk.delta.journal import Kind
from shadowblk.delta.stream import RawFrame, check, encode, read_frame, read_raw
from shadowblk.delta.volume_state import VOLUME_ID, StateFileError

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
MAX_NACKS = 64
QUEUE_FRAMES = 64  # checked frames (at most 1 MiB of data each) waiting for the applier
OFF_LOOP_BYTES = 64 << 10  # frames this big are checked and staged in a worker thread
GROUP_COMMIT_BYTES = 64 << 20  # staged data above which an epoch commits even if more are queued
INLINE_COMMIT_BYTES = 64 << 10  # epochs this small commit on the loop (a sync flush's latency)
CHECKPOINT_IDLE = 0.2  # seconds without a frame after which committed epochs are checkpointed
STAGED_EVERY = 4 << 20  # confirm staged frames this often, so the sender can forget them
_KINDS = {FrameType.EXTENT: Kind.DATA, FrameType.ZERO: Kind.ZERO, FrameType.TRIM: Kind.TRIM}


class ShadowServer:
    """Every volume in DATA_DIR, recovered at start, and the streams that feed them."""

    def __init__(
        self,
        data_dir: Path,
        key: bytes | None,
        tls: ssl.SSLContext | None,
        devices: dict[str, Path] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.devices = devices or {}  # volume id -> the operator's device for its image
        self.key = key
        self.tls = tls
        self.volumes: dict[str, ShadowVolume] = {}
        self.streams: dict[str, asyncio.Task] = {}
        self.broken: dict[str, str] = {}  # volumes whose state cannot be trusted: hands off
        data_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(data_dir.glob("*.state")):
            try:
                vid = path.name.removesuffix(".state")
                volume = ShadowVolume.load(data_dir, path, self.devices.get(vid))
            except StateFileError as exc:
                log.error("not serving until an operator looks: %s", exc)
                self.broken[vid] = str(exc)
                continue
            self.volumes[volume.state.volume_id] = volume
            log.info("volume %s at epoch %d", volume.state.volume_id, volume.applied)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        stream = _Stream(self, reader, writer, peer)
        try:
            await stream.run()
        except asyncio.CancelledError:
            log.info("stream from %s stopped (shutdown or superseded)", peer)
        except Exception as exc:  # the daemon outlives any one peer
            log.exception("stream from %s failed: %s", peer, exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def close(self) -> None:
        for task in list(self.streams.values()):
            task.cancel()
        for task in list(self.streams.values()):
            with contextlib.suppress(BaseException):
                await task


class _Stream:
    """One connection: HELLO, WELCOME, then frames in sequence until it ends."""

    def __init__(
        self,
        server: ShadowServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: object,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.session = Session(server.key, bytes(NONCE_SIZE))
        self.out_seq = 0
        self.volume: ShadowVolume | None = None
        self.vol_key = 0
        self.generation = 0
        self.dctx = zstandard.ZstdDecompressor()
        self.ends_queued = 0  # committing EPOCH_ENDs received, not yet taken by the applier

    async def send(
        self, ftype: FrameType, epoch: int = 0, payload: bytes = b"", offset: int = 0
    ) -> None:
        self.out_seq += 1
        frame = Frame(
            ftype, self.vol_key, self.generation, epoch, self.out_seq, offset, payload=payload
        )
        self.writer.write(encode(frame, self.session))
        await self.writer.drain()

    async def refuse(self, exc: FrameError) -> None:
        log.warning("refusing stream from %s: %s (%s)", self.peer, exc, exc.code.name)
        with contextlib.suppress(Exception):
            await self.send(FrameType.ERROR, payload=pack_error(exc.code, str(exc)))

    async def run(self) -> None:
        try:
            frame, hello = await self._hello()
        except FrameError as exc:
            await self.refuse(exc)
            return
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            return
        task = asyncio.current_task()
        assert task is not None
        vid = hello.volume_id
        known = self.server.volumes.get(vid)
        try:
            if vid in self.server.broken:
                raise FrameError(ErrorCode.INTERNAL, self.server.broken[vid])
            if known is not None:
                known.check(hello)  # a stale or wrong sender never ends a legitimate stream
        except FrameError as exc:
            self.session = Session(self.server.key, hello.nonce)
            await self.refuse(exc)
            return
        old = self.server.streams.get(vid)
        if old is not None:
            log.info("stream for %s from %s supersedes an older one", vid, self.peer)
            old.cancel()
            with contextlib.suppress(BaseException):
                await old
        self.server.streams[vid] = task
        try:
            await self._welcome(frame, hello)
            await self._frames()
        except FrameError as exc:
            await self.refuse(exc)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            log.info("stream for %s from %s ended: %s", vid, self.peer, exc or type(exc).__name__)
        except OSError as exc:  # the shadow's own storage failed: say so, keep the volume as is
            log.error("volume %s: I/O error: %s", vid, exc)
            await self.refuse(FrameError(ErrorCode.INTERNAL, f"shadow I/O error: {exc}"))
        finally:
            if self.server.streams.get(vid) is task:
                try:  # still registered meanwhile: a next stream waits for this one to end
                    if self.volume is not None:
                        await _finish(self.volume.end_stream)
                finally:
                    if self.server.streams.get(vid) is task:
                        del self.server.streams[vid]

    async def _hello(self) -> tuple[Frame, Hello]:
        frame = await asyncio.wait_for(read_frame(self.reader, self.session), HELLO_TIMEOUT)
        if frame.type is not FrameType.HELLO:
            raise FrameError(ErrorCode.PROTOCOL, f"expected HELLO, got {frame.type.name}")
        hello = unpack_hello(frame.payload)
        if not VOLUME_ID.match(hello.volume_id):
            raise FrameError(ErrorCode.PROTOCOL, f"bad volume id {hello.volume_id!r}")
        if frame.vol_key != volume_key(hello.volume_id):
            raise FrameError(ErrorCode.PROTOCOL, "frame volume key does not match the volume id")
        bs = hello.block_size
        if bs < 512 or bs > MAX_EXTENT or bs & (bs - 1) or hello.size <= 0 or hello.size % bs:
            raise FrameError(
                ErrorCode.VOLUME_MISMATCH, f"bad geometry: size {hello.size}, block size {bs}"
            )
        if len(hello.nonce) != NONCE_SIZE:
            raise FrameError(ErrorCode.PROTOCOL, "bad nonce")
        return frame, hello

    async def _welcome(self, frame: Frame, hello: Hello) -> None:
        """Bind the stream to its volume (created if new, checked if known) and answer."""
        self.session = Session(self.server.key, hello.nonce)  # binds WELCOME to this HELLO
        volume = self.server.volumes.get(hello.volume_id)
        if volume is None:
            volume = await asyncio.to_thread(
                ShadowVolume.create,
                self.server.data_dir,
                hello,
                self.server.devices.get(hello.volume_id),
            )
            self.server.volumes[hello.volume_id] = volume
            log.info("new volume %s: %d bytes", hello.volume_id, hello.size)
        else:
            volume.accept(hello)
        self.volume = volume
        self.vol_key = frame.vol_key
        self.generation = hello.generation
        nonce = os.urandom(NONCE_SIZE)
        st = volume.state
        welcome = Welcome(
            nonce, volume.applied > 0, volume.applied, st.generation, st.size, st.block_size
        )
        self.out_seq = -1  # WELCOME goes out as sequence 0
        await self.send(FrameType.WELCOME, payload=pack_welcome(welcome))
        self.session = Session(self.server.key, hello.nonce, nonce)
        log.info(
            "stream for %s from %s: generation %d, shadow at epoch %d, sender thinks %d",
            hello.volume_id,
            self.peer,
            hello.generation,
            volume.applied,
            hello.acked_epoch,
        )

    async def _frames(self) -> None:
        """Receive and check frames while the previous epoch commits: a receiving task feeds
        checked frames to an applying task through a short queue."""
        assert self.volume is not None
        self.volume.begin_stream()
        queue: asyncio.Queue[tuple[Frame, bytes]] = asyncio.Queue(QUEUE_FRAMES)
        tasks = {
            asyncio.ensure_future(self._receive(queue)),
            asyncio.ensure_future(self._apply_all(queue)),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self, queue: asyncio.Queue[tuple[Frame, bytes]]) -> None:
        expected, awaiting, nacks, unconfirmed = 1, False, 0, 0
        while True:
            try:
                raw = await asyncio.wait_for(read_raw(self.reader), IDLE_TIMEOUT)
                if len(raw.payload) >= OFF_LOOP_BYTES:  # hashes and zstd release the GIL
                    got = await asyncio.to_thread(self._take, raw, expected, awaiting)
                else:
                    got = self._take(raw, expected, awaiting)
                if got is None:
                    continue  # in flight before our NACK: the sender goes back
                frame, data = got
            except FrameError as exc:
                if exc.fatal:
                    raise
                if awaiting and exc.seq is not None and exc.seq > expected:
                    continue
                nacks += 1
                if nacks > MAX_NACKS:
                    raise FrameError(ErrorCode.TOO_MANY_NACKS, f"{nacks} NACKs: giving up") from exc
                log.warning("NACK seq %d from %s: %s", expected, self.peer, exc)
                awaiting = True
                await self.send(FrameType.NACK, payload=pack_nack(expected, exc.code, str(exc)))
                continue
            expected += 1
            awaiting = False
            if frame.type is FrameType.EPOCH_END and not frame.flags & FLAG_MERGE:
                self.ends_queued += 1
            await queue.put((frame, data))
            unconfirmed += len(frame.payload) + 256
            if unconfirmed >= STAGED_EVERY:
                unconfirmed = 0
                await self.send(FrameType.STAGED, offset=frame.seq)

    def _take(self, raw: RawFrame, expected: int, awaiting: bool) -> tuple[Frame, bytes] | None:
        """The checked frame and its data, or None for a frame to drop while a NACK is out."""
        frame = check(raw, self.session)
        if frame.seq < expected:
            raise FrameError(
                ErrorCode.REPLAY, f"frame seq {frame.seq} replayed (expected {expected})"
            )
        if frame.seq > expected:
            if awaiting:
                return None
            raise FrameError(
                ErrorCode.PROTOCOL, f"gap: seq {frame.seq}, expected {expected}", False
            )
        return frame, self._check(frame)

    async def _apply_all(self, queue: asyncio.Queue[tuple[Frame, bytes]]) -> None:
        volume = self.volume
        assert volume is not None
        while True:
            try:
                if queue.empty():
                    frame, data = await asyncio.wait_for(queue.get(), CHECKPOINT_IDLE)
                else:
                    frame, data = queue.get_nowait()
            except TimeoutError:  # a quiet stream: make the image durable, empty the journal
                if volume.needs_checkpoint():
                    await _finish(volume.checkpoint)
                continue
            await self._apply(frame, data)

    def _check(self, frame: Frame) -> bytes:
        """Everything about FRAME that can be checked before it is staged; its data if any."""
        assert self.volume is not None
        if frame.vol_key != self.vol_key:
            raise FrameError(ErrorCode.PROTOCOL, "frame names another volume")
        if frame.generation != self.generation:
            raise FrameError(
                ErrorCode.STALE_GENERATION,
                f"frame of generation {frame.generation} on a stream of {self.generation}",
            )
        st = self.volume.state
        if frame.type is FrameType.EXTENT:
            check_range(frame.offset, frame.length, st.size, st.block_size, MAX_EXTENT)
            return decode_extent(frame.payload, frame.length, st.block_size, frame.seq, self.dctx)
        if frame.type in (FrameType.ZERO, FrameType.TRIM):
            check_range(frame.offset, frame.length, st.size, st.block_size, None)
        elif frame.type not in (FrameType.EPOCH_END, FrameType.PING):
            raise FrameError(ErrorCode.PROTOCOL, f"unexpected {frame.type.name} from a sender")
        return b""

    async def _apply(self, frame: Frame, data: bytes) -> None:
        volume = self.volume
        assert volume is not None
        if frame.type in _KINDS:
            args = (_KINDS[frame.type], frame.offset, frame.length, frame.epoch, data)
            if len(data) >= OFF_LOOP_BYTES:  # overlaps with the receiving of the next frames
                await _finish(volume.stage, *args)
            else:
                volume.stage(*args)
        elif frame.type is FrameType.PING:
            await self.send(FrameType.PONG, epoch=volume.applied)
        elif frame.flags & FLAG_MERGE:
            volume.mark_epoch_end(frame.epoch)
        else:
            self.ends_queued -= 1
            if self.ends_queued and volume.staged_bytes() < GROUP_COMMIT_BYTES:
                # a later epoch is complete in the queue already: commit both at its end
                # (the image goes from one epoch boundary to a later one, as with MERGE)
                volume.mark_epoch_end(frame.epoch)
                return
            if volume.cheap_commit(INLINE_COMMIT_BYTES):
                volume.commit(frame.epoch)  # one small fdatasync: cheaper than two thread hops
            else:
                await _finish(volume.commit, frame.epoch)
            log.debug("%s: epoch %d applied", volume.state.volume_id, frame.epoch)
            await self.send(FrameType.EPOCH_APPLIED, epoch=frame.epoch)
            if volume.checkpoint_due():
                await _finish(volume.checkpoint)


async def _finish(func: Callable[..., None], *args: object) -> None:
    """Run FUNC in a worker thread; a cancelled caller (even cancelled again, as when a stream
    is superseded during shutdown) still waits for it to finish, so nothing else uses the
    volume (or its journal's descriptor) while it runs."""
    work = asyncio.ensure_future(asyncio.to_thread(func, *args))
    cancelled = False
    while not work.done():
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            cancelled = True
    work.result()  # FUNC's own exception, if any
    if cancelled:
        raise asyncio.CancelledError
