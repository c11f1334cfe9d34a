"""The shadow server: accepts delta streams, one per volume at a time, and applies them.

One asyncio loop; per stream a receiving task checks frames while an applying task stages
them and seals epochs in the journal (fsyncs in a worker thread, so other volumes and the next
epoch keep streaming) and an image task writes each sealed epoch to the image and acknowledges
it while the next one is staged; a small frame that finds nothing queued is applied by the
receiving task itself (a small epoch's commit then waits for no task switch). A bad peer gets
an ERROR frame (or a NACK for a frame whose bytes are damaged) and never touches a volume.

A volume changing role on this server (docs/switchover.md) is handed over alone, through the
control socket (`serve_control`): `prime` checkpoints it at the next epoch boundary and then
leaves its commits alone (no idle or periodic checkpoint) until it is released, so the last
epoch of a switchover waits for no image sync and the release has little left to sync;
`release` ends its stream at an epoch boundary (checkpointed: state file current, journal
empty), forgets it and refuses streams for it while held; `adopt` ends the hold and loads the
volume if its files are here (a demoted primary's copy). The other volumes' streams go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard

from shadowblk.delta.applier import CHECKPOINT_BYTES, ShadowVolume
from shadowblk.delta.auth import Session
from shadowblk.delta.extents import Extents, check_range, decode_extents
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
from shadowblk.delta.heap import keep_freed_buffers
from shadowblk.delta.journal import Kind
from shadowblk.delta.stream import FrameReader, RawFrame, check, encode, read_frame
from shadowblk.delta.volume_state import VOLUME_ID, StateFileError

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
MAX_NACKS = 64
QUEUE_FRAMES = 64  # checked frames (at most 1 MiB of data each) waiting for the applier
IMAGE_EPOCHS = 2  # sealed epochs waiting for their image writes (their records held in memory)
OFF_LOOP_BYTES = 64 << 10  # frames this big are checked and staged in a worker thread
GROUP_COMMIT_BYTES = 64 << 20  # staged data above which an epoch commits even if more are queued
INLINE_COMMIT_BYTES = 64 << 10  # epochs this small commit on the loop (a sync flush's latency)
CHECKPOINT_IDLE = 0.2  # seconds without a frame after which committed epochs are checkpointed
STAGED_EVERY = 4 << 20  # confirm staged frames this often, so the sender can forget them
CONTROL_LINE = 4096  # the longest control command
_KINDS = {FrameType.ZERO: Kind.ZERO, FrameType.TRIM: Kind.TRIM}


class ShadowServer:
    """Every volume in DATA_DIR, recovered at start, and the streams that feed them."""

    def __init__(
        self,
        data_dir: Path,
        key: bytes | None,
        tls: ssl.SSLContext | None,
        devices: dict[str, Path] | None = None,
        held: dict[str, float] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.devices = devices or {}  # volume id -> the operator's device for its image
        self.key = key
        self.tls = tls
        self.volumes: dict[str, ShadowVolume] = {}
        self.streams: dict[str, asyncio.Task] = {}
        self.broken: dict[str, str] = {}  # volumes whose state cannot be trusted: hands off
        now = time.monotonic()  # volume -> monotonic end of its hold: no stream feeds it
        self.held = {vid: now + seconds for vid, seconds in (held or {}).items()}
        self.quiet: dict[str, float] = {}  # volume -> monotonic end: a promotion is near
        self.checkpoint_asked: set[str] = set()  # checkpointed at their next epoch boundary
        keep_freed_buffers()  # frames' buffers reused, not faulted in afresh for each frame
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

    def holds(self, vid: str) -> bool:
        """VID is changing role on this server: no stream may feed it (nor create it)."""
        return time.monotonic() < self.held.get(vid, 0.0)

    def prime(self, vid: str, seconds: float) -> dict[str, Any]:
        """VID is about to be promoted: checkpoint it at its next epoch boundary (writes still
        flow), then no idle or periodic checkpoint for SECONDS (or until it is released), so
        that the switchover's last epoch commits without waiting for an image sync."""
        self.quiet[vid] = time.monotonic() + seconds
        self.checkpoint_asked.add(vid)
        volume = self.volumes.get(vid)
        return {"epoch": None if volume is None else volume.applied}

    async def primed(self, vid: str, wait: float) -> dict[str, Any]:
        """Wait up to WAIT seconds for the checkpoint `prime` asked for (made at the stream's
        next epoch boundary; a volume no stream feeds was checkpointed when its stream ended)."""
        deadline = time.monotonic() + wait
        while vid in self.checkpoint_asked and vid in self.streams:
            if time.monotonic() >= deadline:
                return {"checkpointed": False}
            await asyncio.sleep(0.005)
        return {"checkpointed": True}

    def checkpoint_wanted(self, vid: str, volume: ShadowVolume, due: bool) -> bool:
        """Checkpoint VOLUME now? DUE: by its own rule (idle, age or size)."""
        if vid in self.checkpoint_asked:
            return volume.needs_checkpoint()
        quiet = time.monotonic() < self.quiet.get(vid, 0.0)
        return due and (not quiet or volume.journal.committed_end >= CHECKPOINT_BYTES)

    def checkpointed(self, vid: str) -> None:
        self.checkpoint_asked.discard(vid)

    async def release(self, vid: str, seconds: float) -> dict[str, Any]:
        """Hold VID for SECONDS and let go of its files: its stream ends at an epoch boundary
        and checkpoints (the state file says the last applied epoch, the journal is empty);
        the volume is forgotten. Its last applied epoch, if it was hosted here."""
        self.held[vid] = time.monotonic() + seconds
        self.quiet.pop(vid, None)
        self.checkpoint_asked.discard(vid)
        task = self.streams.get(vid)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        volume = self.volumes.pop(vid, None)
        if volume is None:
            return {"epoch": None}
        cmap, volume.checksums.map = volume.checksums.map, None
        if cmap is not None:  # flushed by the checkpoint: the files are the promoter's now
            await asyncio.to_thread(cmap.close)
        log.info("volume %s handed over at epoch %d (held %.0f s)", vid, volume.applied, seconds)
        return {"epoch": volume.applied}

    async def adopt(self, vid: str) -> dict[str, Any]:
        """End VID's hold; load it first if its files are here and it is not served yet (a
        demoted primary's copy): a stream for it is refused until then."""
        path = self.data_dir / f"{vid}.state"
        if vid not in self.volumes and path.exists():
            try:
                volume = await asyncio.to_thread(
                    ShadowVolume.load, self.data_dir, path, self.devices.get(vid)
                )
            except StateFileError as exc:
                log.error("not serving until an operator looks: %s", exc)
                self.broken[vid] = str(exc)
            else:
                self.volumes[vid] = volume
                self.broken.pop(vid, None)
                log.info("volume %s adopted at epoch %d", vid, volume.applied)
        self.held.pop(vid, None)
        known = self.volumes.get(vid)
        return {"epoch": None if known is None else known.applied}

    async def serve_control(self, path: Path) -> asyncio.AbstractServer:
        """Listen on the Unix socket PATH for the agent's one-line JSON commands:
        {"op": "prime", "volume": V, "seconds": S, "wait": W?} (W: answer once checkpointed, at
        most W s), {"op": "release", "volume": V, "seconds": S},
        {"op": "adopt", "volume": V}, {"op": "status"}; one JSON line answers each."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = await asyncio.start_unix_server(self._control, str(path), limit=CONTROL_LINE)
        os.chmod(path, 0o600)
        return listener

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                answer = await self._command(line)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError):  # a line too long, a client gone
            pass
        finally:
            writer.close()

    async def _command(self, line: bytes) -> dict[str, Any]:
        try:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "status":
                held = [vid for vid in self.held if self.holds(vid)]
                return {"ok": True, "volumes": sorted(self.volumes), "held": held}
            vid = str(cmd["volume"])
            if not VOLUME_ID.match(vid):
                raise ValueError(f"bad volume id {vid!r}")
            if op == "prime":
                primed = self.prime(vid, float(cmd["seconds"]))
                return {"ok": True, **primed, **await self.primed(vid, float(cmd.get("wait", 0)))}
            if op == "release":
                return {"ok": True, **await self.release(vid, float(cmd["seconds"]))}
            if op == "adopt":
                return {"ok": True, **await self.adopt(vid)}
            return {"ok": False, "error": f"unknown op {op!r}"}
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": f"bad command: {exc}"}
        except OSError as exc:
            return {"ok": False, "error": f"I/O error: {exc}"}

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
        self.queued = 0  # frames in the queue or being applied by the applying task
        self.applying = False  # a frame is being applied, or a checkpoint made, right now
        self.last_frame = 0.0  # monotonic time the receiver last applied a frame itself
        self.writeback: asyncio.Future | None = None  # the image's writeback hint in flight
        self.images: asyncio.Queue[tuple[int, bool]] = asyncio.Queue(IMAGE_EPOCHS)
        self.unacked = 0  # sealed epochs handed to the image task and not acknowledged yet

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
            if self.server.holds(vid):  # INTERNAL: the sender tries again later
                raise FrameError(ErrorCode.INTERNAL, f"volume {vid} is changing role here")
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
            if self.server.holds(vid):  # released meanwhile: its files are not ours any more
                self.session = Session(self.server.key, hello.nonce)
                await self.refuse(FrameError(ErrorCode.INTERNAL, f"volume {vid} changes role"))
                return
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
        checked frames to an applying task through a short queue (or applies a quick frame
        itself when nothing is queued or being applied)."""
        assert self.volume is not None
        self.volume.begin_stream()
        queue: asyncio.Queue[tuple[Frame, Extents | None]] = asyncio.Queue(QUEUE_FRAMES)
        tasks = {
            asyncio.ensure_future(self._receive(queue)),
            asyncio.ensure_future(self._apply_all(queue)),
            asyncio.ensure_future(self._apply_images()),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            try:
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:  # even when cancelled again meanwhile (`_wait`): the end of the stream
                await self._written_back()  # closes the image the hint writes back

    async def _receive(self, queue: asyncio.Queue[tuple[Frame, Extents | None]]) -> None:
        expected, awaiting, nacks, unconfirmed = 1, False, 0, 0
        frames = FrameReader.attach(self.reader, self.writer)  # no copy, no task per frame
        while True:
            try:
                raw = await frames.read(IDLE_TIMEOUT)
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
            if not self.queued and not self.applying and self._quick(frame):
                await self._apply_here(frame, data)
            else:
                self.queued += 1
                await queue.put((frame, data))
            unconfirmed += len(frame.payload) + 256
            if unconfirmed >= STAGED_EVERY:
                unconfirmed = 0
                await self.send(FrameType.STAGED, offset=frame.seq)

    def _take(
        self, raw: RawFrame, expected: int, awaiting: bool
    ) -> tuple[Frame, Extents | None] | None:
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

    def _quick(self, frame: Frame) -> bool:
        """Applying FRAME needs no worker thread (a small frame, or the end of a small epoch
        that commits on the loop)."""
        assert self.volume is not None
        if frame.type is FrameType.EPOCH_END and not frame.flags & FLAG_MERGE:
            return self.volume.cheap_commit(INLINE_COMMIT_BYTES)
        return len(frame.payload) < OFF_LOOP_BYTES

    async def _apply_here(self, frame: Frame, data: Extents | None) -> None:
        """Apply a quick frame on the receiving task, nothing being queued or applied: a sync
        flush's epoch commits without waking the applying task (a task switch, and in Python
        3.11 a task per `wait_for`)."""
        self.applying = True
        try:
            await self._apply(frame, data)
        finally:
            self.applying = False
            self.last_frame = time.monotonic()

    async def _apply_all(self, queue: asyncio.Queue[tuple[Frame, Extents | None]]) -> None:
        volume = self.volume
        assert volume is not None
        while True:
            try:
                if queue.empty():
                    frame, data = await asyncio.wait_for(queue.get(), CHECKPOINT_IDLE)
                else:
                    frame, data = queue.get_nowait()
            except TimeoutError:  # a quiet stream: make the image durable, empty the journal
                if self.applying or time.monotonic() - self.last_frame < CHECKPOINT_IDLE:
                    continue  # the receiving task applies frames itself: not quiet
                self.applying = True
                try:
                    await self._checkpoint(volume.needs_checkpoint())
                finally:
                    self.applying = False
                continue
            try:
                await self._apply(frame, data)
            finally:
                self.queued -= 1

    def _check(self, frame: Frame) -> Extents | None:
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
            return decode_extents(frame, st.size, st.block_size, self.dctx)
        if frame.type in (FrameType.ZERO, FrameType.TRIM):
            check_range(frame.offset, frame.length, st.size, st.block_size)
        elif frame.type not in (FrameType.EPOCH_END, FrameType.PING):
            raise FrameError(ErrorCode.PROTOCOL, f"unexpected {frame.type.name} from a sender")
        return None

    async def _apply(self, frame: Frame, data: Extents | None) -> None:
        volume = self.volume
        assert volume is not None
        if data is not None:  # an EXTENT frame
            if len(data.data) >= OFF_LOOP_BYTES or not volume.stages_in_memory(len(data.data)):
                # overlaps with the receiving of the next frames; a journal write never stalls
                # the loop
                await _finish(volume.stage_extents, frame.epoch, data)
            else:
                volume.stage_extents(frame.epoch, data)
        elif frame.type in _KINDS:
            volume.stage(_KINDS[frame.type], frame.offset, frame.length, frame.epoch)
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
            inline = volume.cheap_commit(INLINE_COMMIT_BYTES)
            if inline and not self.unacked:  # one small fdatasync: cheaper than two thread hops
                volume.commit(frame.epoch)
                await self._applied(frame.epoch, inline)
            else:  # the next epoch is staged while this one's records go to the image
                if inline:
                    volume.seal(frame.epoch)
                else:
                    await _finish(volume.seal, frame.epoch)
                self.unacked += 1
                await self.images.put((frame.epoch, inline))
            await self._checkpoint(volume.checkpoint_due())

    async def _apply_images(self) -> None:
        """The image task: writes each sealed epoch's records to the image, in order, and
        acknowledges it, while the applying task stages the next epochs into the journal
        (the image's `pwrite`s of an epoch of 4 KiB random writes took as long as staging it:
        done one after the other, they halved the rate). The acknowledgement still follows
        the image writes, so an acknowledged epoch is on the image (page cache) and in the
        checksum map, where a read-only export and `verify` read it, as before; its
        durability is the journal's COMMIT record, written before the epoch was queued here."""
        volume = self.volume
        assert volume is not None
        while True:
            epoch, small = await self.images.get()
            try:
                if small:
                    volume.apply_next()
                else:
                    await _finish(volume.apply_next)
                await self._applied(epoch, small)
                self.unacked -= 1
            finally:
                self.images.task_done()

    async def _applied(self, epoch: int, small: bool) -> None:
        """EPOCH is durable and on the image: acknowledge it; a big one's writeback starts."""
        assert self.volume is not None
        log.debug("%s: epoch %d applied", self.volume.state.volume_id, epoch)
        await self.send(FrameType.EPOCH_APPLIED, epoch=epoch)
        if not small:
            self._write_back()

    def _write_back(self) -> None:
        """Start the image's writeback in a worker thread of its own, unless one still runs
        (it covers every dirty page, the new ones too): submitting the I/O of an epoch of
        random 4 KiB writes blocks for a third of a second (16 MiB, measured under
        `tools.bench.shadow_cost`), which on the applying task held up the staging of the
        next epochs. Only a hint (never a durability point: the journal makes an epoch
        durable, the checkpoint's fdatasync the image), so nothing waits for it but what
        needs the image's descriptor alone: a checkpoint and the end of the stream."""
        if self.writeback is None or self.writeback.done():
            assert self.volume is not None
            self.writeback = asyncio.ensure_future(asyncio.to_thread(self.volume.write_back))

    async def _written_back(self) -> None:
        """Wait for the writeback in flight, if any (even if cancelled: see `_wait`)."""
        if self.writeback is not None:
            work, self.writeback = self.writeback, None
            await _wait(work)

    async def _checkpoint(self, due: bool) -> None:
        """Checkpoint if DUE by the volume's rule (unless a promotion is near) or if asked."""
        volume = self.volume
        assert volume is not None
        vid = volume.state.volume_id
        if self.server.checkpoint_wanted(vid, volume, due):
            await self.images.join()  # every sealed epoch on the image first
            await self._written_back()
            await _finish(volume.checkpoint)
        if volume.applied <= volume.state.last_applied:  # the image is durable at its epoch
            self.server.checkpointed(vid)


async def _finish(func: Callable[..., None], *args: object) -> None:
    """Run FUNC in a worker thread; a cancelled caller (even cancelled again, as when a stream
    is superseded during shutdown) still waits for it to finish, so nothing else uses the
    volume (or its journal's descriptor) while it runs."""
    await _wait(asyncio.ensure_future(asyncio.to_thread(func, *args)))


async def _wait(work: asyncio.Future) -> None:
    """Wait for WORK (a worker thread's) to end, cancelled or not; then raise its exception,
    or CancelledError if the caller was cancelled meanwhile."""
    cancelled = False
    while not work.done():
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            cancelled = True
    work.result()  # FUNC's own exception, if any
    if cancelled:
        raise asyncio.CancelledError
