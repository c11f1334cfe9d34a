"""The primary's replicator: captures every write, cuts epochs, ships them to every shadow.

Public interface (thread-safe; the NBD server calls it from its connection threads):

    rep = Replicator(volume_id, fd, size, ["host:port", ...], state_dir,
                     block_size=4096, generation=1, mode="async" | "sync", level=1,
                     max_lag_bytes=64 MiB, cut_interval=1.0, hmac_key=b"...", tls=None)
    rep.start()
    rep.on_write(offset, data)      # before the write is acknowledged; may block (back-pressure)
    rep.on_writes([(offset, data), ...])  # a batch, in order (the native NBD loop's)
    rep.on_zero(offset, length)     # WRITE_ZEROES
    rep.on_trim(offset, length)     # TRIM
    rep.cut_epoch() -> int          # close the open epoch (any moment is a valid cut)
    rep.flush() -> int              # at FLUSH: cut; in sync mode wait for every in-sync shadow
    await rep.aflush()              # the same for asyncio callers
    rep.drain(timeout) -> bool      # cut and wait until every shadow applied everything
    rep.status() -> dict            # per shadow: connected, phase, in_sync, lag, acked, throughput
    rep.close()

Call on_write/on_zero/on_trim *before* writing the volume (the range is recorded durably first,
so a kill -9 of the primary cannot forget it) and acknowledge after both. They raise FencedError
once a shadow reports a newer generation (I3): the primary must fail the write.
Wire format, epochs, resync and modes: docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shadowblk.delta.epoch import Epoch, Mark
from shadowblk.delta.frames import volume_key
from shadowblk.delta.heap import keep_freed_buffers
from shadowblk.delta.primary_state import CHUNK, EpochCounter, claim
from shadowblk.delta.shipper import ShadowLink
from shadowblk.delta.volume_state import VOLUME_ID
from shadowblk.tracking.bitmap import DirtyBitmap

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 1.0
AL_CHUNKS = 128  # hot chunks (of 4 MiB) kept in the activity log before idle ones are let go
CUT_SHARE = 4  # an open epoch holding this share of the lag budget is cut and starts shipping


class FencedError(Exception):
    """A shadow holds a newer generation of this volume: this primary may not accept writes."""


@dataclass
class Plan:
    kind: str  # "streaming" (from memory), "resync" (lacks bitmap) or "full-sync"
    start_after: int
    lacks: DirtyBitmap | None = None


class Replicator:
    def __init__(
        self,
        volume_id: str,
        fd: int,
        size: int,
        shadows: Sequence[str],
        state_dir: Path,
        *,
        block_size: int = 4096,
        generation: int = 1,
        mode: str = "async",
        level: int = 1,
        max_lag_bytes: int = 64 << 20,
        cut_interval: float | None = 1.0,
        hmac_key: bytes | None = None,
        tls: Any = None,
    ) -> None:
        if not VOLUME_ID.match(volume_id):
            raise ValueError(f"bad volume id {volume_id!r}")
        if mode not in ("async", "sync"):
            raise ValueError(f"mode must be async or sync, not {mode!r}")
        if size % block_size:
            raise ValueError(f"size {size} is not a multiple of the block size {block_size}")
        if hmac_key is None and tls is None:
            raise ValueError("streams must be authenticated: give hmac_key or tls")
        self.volume_id = volume_id
        self.vol_key = volume_key(volume_id)
        self.fd = fd
        self.size = size
        self.block_size = block_size
        self.generation = generation
        self.mode = mode
        self.level = level
        self.max_lag_bytes = max_lag_bytes
        self.cut_interval = cut_interval
        self.key = hmac_key
        self.tls = tls
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Condition()
        self._owner = claim(self.state_dir)
        self.counter = EpochCounter(self.state_dir, volume_id, size, block_size)
        self.open = Epoch(block_size)
        self.closed: list[Epoch] = []
        self.last_cut = 0
        self.fenced = False
        self.closing = False
        self.links = [ShadowLink(self, *_address(s)) for s in shadows]
        # what the NBD server holds from a write's capture through the volume's write (its
        # `tracker.ordering`, set by `shadowblk serve`): a plan is made under it, so that every
        # write captured in an epoch before the plan is on the volume when a sync reads it (a
        # write half-way would be read as its old data and never streamed: I1); the default,
        # for callers that capture and write in one thread, holds nothing
        self.writers: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        keep_freed_buffers()  # captured writes and frames: reused heap, not fresh zeroed pages
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"replicator-{self.volume_id}", daemon=True
        )
        self._thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        for link in self.links:
            link.kick = asyncio.Event()
            self._start_link(link)
        self._tasks.append(loop.create_task(self._housekeeping()))
        loop.call_soon(ready.set)
        try:
            loop.run_until_complete(self._until_done())
        finally:
            loop.close()

    async def _until_done(self) -> None:
        """Until every task ended, those of links added later (set_shadows) too."""
        while pending := [task for task in self._tasks if not task.done()]:
            await asyncio.wait(pending)

    def _start_link(self, link: ShadowLink) -> None:
        """(event loop) Run LINK's connection loop; not once closing (close cancels only the
        tasks it sees)."""
        if not self.closing:
            link.task = self._loop.create_task(link.run())  # type: ignore[union-attr]
            self._tasks.append(link.task)

    def set_shadows(self, shadows: Sequence[str]) -> list[str]:
        """Ship to SHADOWS from now on, without a restart (a shadow placed while this primary
        serves, a lost one dropped): a new shadow starts as any shadow without a record (a full
        sync, then the stream); a dropped one's link stops and its record is deleted (what is
        written from now on is not marked as lacking there: added again, it gets a full sync,
        never a resync from a stale bitmap). Returns the addresses added."""
        wanted = list(dict.fromkeys(f"{h}:{p}" for h, p in map(_address, shadows)))
        with self.lock:
            known = {link.name for link in self.links}
        added = [ShadowLink(self, *_address(s)) for s in wanted if s not in known]  # records
        with self.lock:  # opened off the lock (the activity log's first sync)
            gone = [link for link in self.links if link.name not in wanted]
            self.links = [link for link in self.links if link.name in wanted] + added
            self._release()  # a dropped shadow no longer holds epochs in memory
        for link in gone:
            link.record.drop()
            if self._loop is not None and getattr(link, "task", None) is not None:
                self._loop.call_soon_threadsafe(link.task.cancel)
        for link in added:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._start_link, link)
        return [link.name for link in added]

    def close(self) -> None:
        """Stop shipping and persist what every shadow still lacks."""
        self.closing = True
        if self._loop is not None and self._thread is not None:
            for task in self._tasks:
                self._loop.call_soon_threadsafe(task.cancel)
            self._thread.join(30)
        for link in self.links:
            self._checkpoint(link, final=True)
            link.record.log.close()
        os.close(self._owner)

    # --- capture (writer threads) ------------------------------------------------------------

    def on_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Capture a write into the open epoch (the latest data per block wins)."""
        self.on_writes([(offset, data)])

    def on_writes(self, writes: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Capture WRITES, in order, under one lock and one round of record saves (a batch of
        the native NBD loop). Raises before capturing any if one of them is refused. A whole
        block given as `bytes` (the native loop's own copy of the payload: immutable) is kept
        as it is, without another copy or view."""
        bs = self.block_size
        offsets = [offset for offset, _ in writes]
        lengths = [len(d) if type(d) is bytes else memoryview(d).nbytes for _, d in writes]
        for offset, length in zip(offsets, lengths, strict=True):
            self._check(offset, length)
        with self.lock:
            epoch = self.open
            for offset, data in writes:
                if type(data) is bytes and len(data) == bs and not offset % bs:
                    epoch.put(offset // bs, data)
                else:
                    self._capture(offset, memoryview(data).cast("B"))
            pending = self._mark_writes(offsets, lengths)
        self._after_capture(pending)

    def _capture(self, offset: int, view: memoryview) -> None:
        """(lock) One write into the open epoch: whole blocks as a run, edges merged."""
        bs = self.block_size
        head = min(-offset % bs, len(view))  # bytes before the first block boundary
        whole = (len(view) - head) // bs * bs
        if head:
            self._put_partial(offset, view[:head])
        if whole:
            self.open.put_run((offset + head) // bs, view[head : head + whole])
        if head + whole < len(view):
            self._put_partial(offset + head + whole, view[head + whole :])

    def on_zero(self, offset: int, length: int) -> None:
        self._ranged(offset, length, Mark.ZERO)

    def on_trim(self, offset: int, length: int) -> None:
        self._ranged(offset, length, Mark.TRIM)

    def _ranged(self, offset: int, length: int, mark: Mark) -> None:
        self._check(offset, length)
        bs = self.block_size
        first, end = -(-offset // bs), (offset + length) // bs
        if first >= end:
            self.on_write(offset, bytes(length))
            return
        if offset < first * bs:
            self.on_write(offset, bytes(first * bs - offset))
        if offset + length > end * bs:
            self.on_write(end * bs, bytes(offset + length - end * bs))
        with self.lock:
            self.open.mark(first, end, mark)
            pending = self._mark(first * bs, (end - first) * bs)
        self._after_capture(pending)

    def _check(self, offset: int, length: int) -> None:
        if self.fenced:
            raise FencedError(f"volume {self.volume_id}: a shadow holds a newer generation")
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside the volume of {self.size} bytes")

    def _put_partial(self, offset: int, data: memoryview) -> None:
        """(lock) DATA, inside one block, merged with the block's latest captured content."""
        block, within = divmod(offset, self.block_size)
        base = bytearray(self._current_block(block))
        base[within : within + len(data)] = data
        self.open.put(block, bytes(base))

    def _current_block(self, block: int) -> bytes:
        """The block's content as of the latest capture (for a partial-block write)."""
        for epoch in [self.open, *reversed(self.closed)]:
            value = epoch.block_at(block)
            if value is not None:
                return value
            if epoch.mark_at(block) is not None:
                return bytes(self.block_size)
        return _pread(self.fd, self.block_size, block * self.block_size)

    def _mark(self, offset: int, length: int) -> list[tuple[ShadowLink, list[int], bool]]:
        """(lock) Add the range to every shadow's lacks; per shadow whose records must grow
        first: the chunks its activity log must add, and whether its saved bitmap must."""
        return self._mark_writes([offset], [length])

    def _mark_writes(
        self, offsets: list[int], lengths: list[int]
    ) -> list[tuple[ShadowLink, list[int], bool]]:
        """(lock) _mark for a batch of ranges. A batch whose chunks are all covered and hot
        already (a busy volume's usual case) only marks the lacks and notes the chunks as
        touched."""
        chunks = {offset // CHUNK for offset in offsets}
        for offset, length in zip(offsets, lengths, strict=True):
            if (offset + length - 1) // CHUNK != offset // CHUNK:
                chunks.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
        pending = []
        for link in self.links:
            rec = link.record
            mark = rec.lacks.mark  # per range: mark_many's arrays cost more for a few
            for offset, length in zip(offsets, lengths, strict=True):
                mark(offset, length)
            if chunks <= rec.covered and chunks <= rec.log.hot:
                rec.touched |= chunks
                continue
            hot: list[int] = []
            show = False
            for offset, length in zip(offsets, lengths, strict=True):
                missing = rec.chunks_missing(offset, length)
                if missing:
                    rec.cover(missing)
                    show = True
                hot += rec.heat(offset, length)
            if hot or show:
                pending.append((link, hot, show))
        return pending

    def _after_capture(self, pending: list[tuple[ShadowLink, list[int], bool]]) -> None:
        for link, hot, show in pending:
            self._save(link, hot, show)
        with self.lock:
            if self.open.nbytes >= self.max_lag_bytes // CUT_SHARE or self._shadows_idle():
                self._cut()  # only closed epochs ship: a full budget in one would stall writes
            if self._lag_bytes() <= self.max_lag_bytes:
                return
            while True:  # back-pressure: ship what is captured, wait for room
                if not self.open.empty:
                    self._cut()
                if self._lag_bytes() <= self.max_lag_bytes or not self._someone_needs_memory():
                    return
                self.lock.wait(0.5)

    def _save(self, link: ShadowLink, hot: list[int], show: bool) -> None:
        """Before the write is captured: HOT chunks durably in the activity log (a crash
        cannot forget them), the grown bitmap where `shadowblk verify` reads it (SHOW)."""
        rec = link.record
        with rec.save_lock:
            if rec.dropped:
                return
            if hot:
                rec.log.add(hot)
            if show:
                with self.lock:
                    snapshot = rec.persisted.copy()
                rec.show(snapshot)

    # --- epochs ------------------------------------------------------------------------------

    def cut_epoch(self) -> int:
        """Close the open epoch; returns its number (the last one if nothing was written)."""
        with self.lock:
            return self._cut()

    def _cut(self, force: bool = False) -> int:
        if self.open.empty and not force:
            return self.last_cut
        epoch, self.open = self.open, Epoch(self.block_size)
        epoch.number = self.counter.take()
        epoch.closed = time.monotonic()
        self.closed.append(epoch)
        self.last_cut = epoch.number
        self._release()
        self._kick()
        return epoch.number

    def flush(self, timeout: float | None = None) -> int:
        """At FLUSH: cut; in sync mode return only once every in-sync shadow applied the epoch."""
        number = self.cut_epoch()
        if self.mode == "sync":
            deadline = None if timeout is None else time.monotonic() + timeout
            with self.lock:
                while any(link.in_sync and link.record.acked < number for link in self.links) and (
                    deadline is None or time.monotonic() < deadline
                ):
                    self.lock.wait(0.5)
        return number

    async def aflush(self) -> int:
        return await asyncio.to_thread(self.flush)

    def drain(self, timeout: float) -> bool:
        """Cut, then wait until every shadow has applied everything written so far."""
        number = self.cut_epoch()
        deadline = time.monotonic() + timeout
        with self.lock:
            while time.monotonic() < deadline:
                if all(link.record.acked >= number and link.in_sync for link in self.links):
                    return True
                self.lock.wait(0.2)
        return False

    def epoch_after(self, number: int) -> Epoch | None:
        with self.lock:
            for epoch in self.closed:
                if epoch.number > number:
                    return epoch
        return None

    def end_of_fuzzy(self) -> int:
        """A sync read ended: the first epoch whose commit makes the shadow consistent again.
        An empty open epoch is cut at once; otherwise it is the next cut."""
        with self.lock:
            if self.open.empty:
                return self._cut(force=True)
            return self.counter.next

    def _shadows_idle(self) -> bool:
        """(lock) Sync mode, something captured, and every in-sync shadow has applied every
        cut epoch: cut now rather than at the FLUSH. The shadow then commits while the FLUSH is
        still on its way and the primary syncs its own copy, so a FLUSH waits for the longer
        of the two instead of both in a row; while an epoch is in flight, writes gather in the
        open one (a group commit)."""
        if self.mode != "sync" or self.open.empty:
            return False
        waited = [link for link in self.links if link.in_sync]
        return bool(waited) and all(link.record.acked >= self.last_cut for link in waited)

    def _lag_bytes(self) -> int:
        return self.open.nbytes + sum(e.nbytes for e in self.closed)

    def _someone_needs_memory(self) -> bool:
        return any(
            link.connected and link.retained_from is not None and not link.fenced
            for link in self.links
        )

    def _release(self) -> None:
        """(lock) Forget epochs no shadow needs; shadows that are away and cost too much memory
        fall back to their lacks bitmap."""
        if self._lag_bytes() > self.max_lag_bytes:
            for link in self.links:
                if not link.connected and link.retained_from is not None:
                    log.warning("%s: away and over the lag budget: will resync", link.name)
                    link.retained_from = None
        keep_from = min(
            (
                max(link.retained_from, link.record.acked + 1)
                for link in self.links
                if link.retained_from is not None
            ),
            default=None,
        )
        self.closed = [e for e in self.closed if keep_from is not None and e.number >= keep_from]
        self.lock.notify_all()

    def _kick(self) -> None:
        if self._loop is None:
            return
        for link in self.links:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(link.kick.set)

    # --- called by the links (event loop thread) ---------------------------------------------

    def plan_between_writes(self, link: ShadowLink, known: bool, applied: int) -> Plan:
        """plan() with no write between its capture and the volume (under `writers`, taken
        before `lock` as the writers take them; blocks: not on the event loop). A writer held
        up by back-pressure meanwhile does not wait for LINK, which is not connected yet."""
        with self.writers:
            return self.plan(link, known, applied)

    def plan(self, link: ShadowLink, known: bool, applied: int) -> Plan:
        """Decide how to bring a shadow that has applied APPLIED up to date."""
        with self.lock:
            link.connected = True
            acked = link.record.acked
            self.counter.skip_past(applied)
            if not known or acked == 0 or applied < acked:
                kind = "full-sync"
            elif link.retained_from is not None and link.retained_from <= applied + 1:
                link.record.acked = max(acked, applied)
                link.in_sync = True
                return Plan("streaming", applied)
            else:
                kind = "resync"
                link.record.acked = max(acked, applied)
            link.in_sync = False
            link.retained_from = self.counter.next
            lacks = link.record.lacks.copy() if kind == "resync" else None
            return Plan(kind, link.retained_from - 1, lacks)

    def on_acked(self, link: ShadowLink, epoch: int, consistent: bool) -> None:
        with self.lock:
            link.record.acked = max(link.record.acked, epoch)
            if consistent:
                link.in_sync = True
            if self._shadows_idle():
                self._cut()  # the writes gathered while the last epoch was in flight
            self._release()

    def on_disconnect(self, link: ShadowLink) -> None:
        with self.lock:
            link.connected = False
            link.in_sync = False
            self._release()

    def on_fenced(self, link: ShadowLink) -> None:
        with self.lock:
            self.fenced = True
            link.retained_from = None
            self._release()

    # --- housekeeping ------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        saved: dict[str, int] = {}
        while not self.closing:
            await asyncio.sleep(min(CHECKPOINT_INTERVAL, self.cut_interval or CHECKPOINT_INTERVAL))
            if self.cut_interval is not None:
                with self.lock:
                    if (
                        not self.open.empty
                        and time.monotonic() - self.open.opened > self.cut_interval
                    ):
                        self._cut()
            for link in self.links:
                if saved.get(link.name) != link.record.acked:
                    # what it saved, not the acked of now: an ack during the save needs another
                    saved[link.name] = await asyncio.to_thread(self._checkpoint, link)

    def _checkpoint(self, link: ShadowLink, final: bool = False) -> int:
        """Shrink the shadow's persisted lacks to what it really lacks now, when known, and,
        past AL_CHUNKS, its activity log to the chunks written since the last checkpoint. The
        FINAL one (no more writes) saves the exact set and an empty log. Returns the
        acknowledged epoch saved."""
        rec = link.record
        with rec.save_lock:
            if rec.dropped:
                return rec.acked
            with self.lock:
                keep = rec.log.hot
                if final:
                    keep = set()
                elif len(keep) > AL_CHUNKS:
                    keep = rec.touched | _chunks(self.open, self.block_size)
                rec.touched = set()
                cooled = keep != rec.log.hot
                rec.log.hot = keep
                if link.retained_from is not None and link.retained_from <= rec.acked + 1:
                    exact = DirtyBitmap(self.size, self.block_size)
                    bs = self.block_size
                    for epoch in [*self.closed, self.open]:
                        if epoch is self.open or epoch.number > rec.acked:
                            for start, end in epoch.ranges():
                                exact.mark(start * bs, (end - start) * bs)
                    rec.lacks = exact
                    rec.persisted = exact.copy()
                    rec.covered = set()
                    rec.cover(sorted(_chunks(self.open, bs)))
                snapshot = rec.lacks.copy() if final else rec.persisted.copy()
                acked = rec.acked
            rec.save(snapshot, acked)
            if cooled:
                rec.log.rewrite(sorted(keep))
        return acked

    # --- reporting ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        with self.lock:
            shadows = []
            for link in self.links:
                unacked = [e for e in self.closed if e.number > link.record.acked]
                oldest = min((e.closed for e in unacked), default=None)
                shadows.append(
                    {
                        "address": link.name,
                        "connected": link.connected,
                        "phase": link.phase,
                        "in_sync": link.in_sync,
                        "acked_epoch": link.record.acked,
                        "lag_epochs": len(unacked),
                        "lag_bytes": sum(e.nbytes for e in unacked) + self.open.nbytes,
                        "lag_seconds": round(now - oldest, 3) if oldest is not None else 0.0,
                        "lacks_bytes": link.record.lacks.count() * self.block_size,
                        "catch_up": link.catch_up,
                        "sync_progress": [link.sync_done[0], link.sync_total],
                        "throughput_bytes_per_s": round(link.throughput(), 1),
                        "sent_bytes": link.sent_bytes,
                        "nacks": link.nacks,
                        "reconnects": link.reconnects,
                        "last_error": link.last_error,
                    }
                )
            return {
                "volume_id": self.volume_id,
                "mode": self.mode,
                "generation": self.generation,
                "fenced": self.fenced,
                "last_cut_epoch": self.last_cut,
                "open_epoch_bytes": self.open.nbytes,
                "lag_bytes": self._lag_bytes(),
                "shadows": shadows,
            }


def _chunks(epoch: Epoch, bs: int) -> set[int]:
    """The CHUNKs an epoch writes."""
    return {
        c
        for start, end in epoch.ranges()
        for c in range(start * bs // CHUNK, (end * bs - 1) // CHUNK + 1)
    }


def _address(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"shadow address {spec!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    return data + bytes(length - len(data))
