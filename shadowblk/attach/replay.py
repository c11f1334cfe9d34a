"""The replay of the unflushed writes on a new primary, in the background, gate open.

After a lost upstream the router must put on the new primary every write it answered since the
last FLUSH (attach/unflushed.py: the shadow that took over may lack them). Replaying them all
before the gate opens made the VM wait for the whole log (seconds for tens of thousands of
writes). Instead the gate opens at once and the replay runs beside the VM's requests, which is
safe because every request that could see or undo a write not yet replayed waits for it:

- a READ, WRITE, TRIM, ... touching a block that a replay write not yet completed touches waits
  until no such replay write is left on its blocks (so it reads the replayed data, and a new
  write lands after the old one, as the VM ordered them);
- a FLUSH, and a request too large to check block by block, wait for the whole replay (a FLUSH
  answered before the replay completes would call durable writes the new primary may not have);
- requests on other blocks go at once: they neither see nor touch what is being replayed.

The replay itself keeps the log's order wherever two writes touch the same block (a write is
sent only once every earlier write on its blocks has completed) and keeps up to WINDOW writes
in flight otherwise. A block a client request waits for goes first: its replay write is sent at
once, out of turn, when it is the only one left on each of its blocks and no wide write (not
counted block by block) is in flight or left over it (the common case), so the request waits
one round trip, not until the replay reaches it. A write whose every block is
wholly overwritten by later writes in the log is not sent at all: the later ones leave the same
content. Replayed writes go without FAST_ZERO (the new primary may refuse a fast zero the old
one did). Nothing leaves the log here: if the new primary is lost too, or fails a replay write
(any error), the next repoint replays the whole log again (writes are idempotent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from shadowblk.attach.unflushed import Write
from shadowblk.attach.upstream import LOST, Upstream
from shadowblk.nbd import protocol as P

log = logging.getLogger(__name__)

SHIFT = 12  # the 4 KiB block of the ordering
BLOCK = 1 << SHIFT
WINDOW = 256  # replay writes in flight at once
WINDOW_BYTES = 16 << 20
WIDE = 256  # blocks: a larger request is not checked block by block (it waits or goes alone)


def touched(offset: int, length: int) -> range:
    """The blocks a request at OFFSET of LENGTH bytes reads or writes any part of."""
    return range(offset >> SHIFT, ((offset + max(length, 1) - 1) >> SHIFT) + 1)


def wholly(offset: int, length: int) -> range:
    """The blocks a request wholly covers (only those does a later write make irrelevant)."""
    return range((offset + (1 << SHIFT) - 1) >> SHIFT, (offset + length) >> SHIFT)


def needed(writes: list[Write]) -> list[Write]:
    """WRITES without those whose every block a later write wholly covers, in order."""
    return [w for w, _ in plan(writes)]


def plan(writes: list[Write]) -> list[tuple[Write, tuple[int, ...]]]:
    """needed(WRITES), each with the blocks it touches (() for a wide one). One pass, a fast
    path for the common single-block write: it runs while the VM waits."""
    covered: set[int] = set()
    kept: list[tuple[Write, tuple[int, ...]]] = []
    for w in reversed(writes):
        offset, length = w.offset, w.length
        first, last = offset >> SHIFT, (offset + max(length, 1) - 1) >> SHIFT
        if first == last:
            if first not in covered:
                kept.append((w, (first,)))
                if length == BLOCK and not offset & (BLOCK - 1):
                    covered.add(first)
        elif last - first >= WIDE:
            kept.append((w, ()))  # never dropped, and not counted as covering anything
        elif not covered.issuperset(range(first, last + 1)):
            kept.append((w, tuple(range(first, last + 1))))
            covered.update(wholly(offset, length))
    kept.reverse()
    return kept


class Replay:
    """One replay of a log on UP; ON_LOST(up, why) runs if UP drops it or fails a write with
    any error (the router then holds requests and replays the whole log again on the next
    upstream: a write not applied must stay in the log, or the next FLUSH calls it durable).

    Planning a large log takes a fraction of a second of Python: the router plans it when the
    gate closes on a lost upstream, while the VM waits for the new primary anyway."""

    def __init__(
        self,
        writes: list[Write],
        up: Upstream,
        on_lost: Callable[[Upstream, str], None],
        planned: list[tuple[Write, tuple[int, ...]]] | None = None,
    ) -> None:
        """PLANNED: plan(WRITES), if it was made beforehand."""
        self.up, self.on_lost = up, on_lost
        self.total = len(writes)
        self._plan = plan(writes) if planned is None else planned
        self.writes = len(self._plan)
        self.completed = 0
        self.started = time.monotonic()
        self.ms: float | None = None  # how long it took, once done
        self.waited = 0  # client requests that waited for a block being replayed
        self.finished = asyncio.Event()  # done, stopped or aborted: nothing more goes out
        self.aborted = False  # the upstream dropped or refused a write
        self.whole = False  # every planned write completed on the upstream
        self._left: dict[int, int] = {}  # block -> replay writes not completed that touch it
        self._wide: list[Write] = []  # wide replay writes not completed
        self._last: dict[int, int] = {}  # block -> the last planned write touching it
        left, last = self._left, self._last
        for i, (w, blocks) in enumerate(self._plan):
            if not blocks:
                self._wide.append(w)
            for b in blocks:
                left[b] = left.get(b, 0) + 1
                last[b] = i
        self._sent = bytearray(len(self._plan))
        self._busy: dict[int, int] = {}  # block -> replay writes in flight that touch it
        self._in_flight = 0
        self._bytes = 0
        self._room = asyncio.Event()
        self._waiters: dict[int, list[asyncio.Future]] = {}
        self._stop = False
        self.task = asyncio.get_running_loop().create_task(self._run())

    # --- what client requests wait for -----------------------------------------------------
    def blocks(self, cmd: int, offset: int, length: int) -> bool:
        """Must a client request wait before it goes to the new primary?"""
        if self.finished.is_set():
            return False
        if cmd == P.CMD_FLUSH or len(touched(offset, length)) > WIDE:
            return True
        return self._first_left(offset, length) is not None or any(
            _overlap(w, offset, length) for w in self._wide
        )

    async def cleared(self, cmd: int, offset: int, length: int) -> None:
        """Return once the request may go (or the replay ended, whichever way)."""
        self.waited += 1
        while self.blocks(cmd, offset, length):
            block = None if cmd == P.CMD_FLUSH else self._first_left(offset, length)
            if block is None or len(touched(offset, length)) > WIDE:
                await self.finished.wait()
                return
            self._hurry(block)
            fut = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(block, []).append(fut)
            await fut

    def _hurry(self, block: int) -> None:
        """A client request waits for BLOCK: send its replay write now, out of turn, if it is
        the one write left on each of its blocks (then no other replay write on them is earlier
        or later, and the order of the log is kept), so the request waits for one round trip,
        not for the replay to reach it."""
        i = self._last.get(block)
        if i is None or self._sent[i] or self._stop:
            return
        w, blocks = self._plan[i]
        if not blocks or any(self._left.get(b) != 1 for b in blocks):
            return
        # a wide write is not counted in _left: one in flight, or one left that overlaps
        # (earlier in the log, maybe), would land after this one out of order
        if -1 in self._busy or any(_overlap(x, w.offset, w.length) for x in self._wide):
            return
        self._send(i)

    def _first_left(self, offset: int, length: int) -> int | None:
        for b in touched(offset, length):
            if b in self._left:
                return b
        return None

    # --- sending ---------------------------------------------------------------------------
    async def _run(self) -> None:
        for i, (w, blocks) in enumerate(self._plan):
            while not self._sent[i] and not self._stop and self._must_wait(blocks, len(w.payload)):
                self._room.clear()
                await self._room.wait()
            if self._stop:
                break
            if not self._sent[i]:  # else sent out of turn for a waiting request (_hurry)
                self._send(i)
        while self._in_flight:
            self._room.clear()
            await self._room.wait()
        self._end()

    def _must_wait(self, blocks: tuple[int, ...], size: int) -> bool:
        if not self._in_flight:
            return False
        if not blocks or -1 in self._busy:  # a wide write goes alone
            return True
        if self._in_flight >= WINDOW or self._bytes + size > WINDOW_BYTES:
            return True
        return any(b in self._busy for b in blocks)

    def _send(self, i: int) -> None:
        w, blocks = self._plan[i]
        self._sent[i] = 1
        keys = blocks or (-1,)
        for b in keys:
            self._busy[b] = self._busy.get(b, 0) + 1
        self._in_flight += 1
        self._bytes += len(w.payload)

        def done(error: int, _data: bytes) -> None:
            self._in_flight -= 1
            self._bytes -= len(w.payload)
            for b in keys:
                _drop(self._busy, b)
            if error:  # not applied: the log must stay (a FLUSH now would call it durable)
                why = {LOST: "connection lost", P.ESHUTDOWN: "ESHUTDOWN"}.get(
                    error, f"error {error}"
                )
                self._abort(f"{self.up.target}: {why} replaying a write at {w.offset}")
            self.completed += 1
            if not blocks:
                if w in self._wide:
                    self._wide.remove(w)
            else:
                for b in blocks:
                    if _drop(self._left, b):
                        for fut in self._waiters.pop(b, ()):
                            if not fut.done():
                                fut.set_result(None)
            self._room.set()

        # no FAST_ZERO: the new primary may refuse it (ENOTSUP) where the old one zeroed
        flags = w.flags & ~P.CMD_FLAG_FAST_ZERO
        self.up.send(w.cmd, flags, w.offset, w.length, w.payload, done)

    def _abort(self, why: str) -> None:
        if self.aborted:
            return
        self.aborted, self._stop = True, True
        log.warning("replay on %s stopped after %d of %d writes: %s", self.up.target,
                    self.completed, self.writes, why)  # fmt: skip
        self.on_lost(self.up, why)  # first: the gate closes before the waiters go on
        self._end()

    async def stop(self, timeout: float) -> None:
        """Send nothing more and wait (up to TIMEOUT) for the writes in flight."""
        self._stop = True
        self._room.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            log.warning("replay writes still in flight after %.1fs", timeout)
            self._end()

    def _end(self) -> None:
        if self.finished.is_set():
            return
        self.ms = (time.monotonic() - self.started) * 1000
        self.whole = not self.aborted and self.completed == self.writes
        self._left.clear()
        self._wide.clear()
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()
        self.finished.set()
        if not self.aborted:
            log.info("replayed %d of %d unflushed writes (%d wholly overwritten later) on %s "
                     "in %.0f ms; %d requests waited for it", self.completed, self.total,
                     self.total - self.writes, self.up.target, self.ms,
                     self.waited)  # fmt: skip


def _drop(counts: dict[int, int], key: int) -> bool:
    """Count one less for KEY; True if none is left."""
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
        return False
    counts.pop(key, None)
    return True


def _overlap(w: Write, offset: int, length: int) -> bool:
    return w.offset < offset + max(length, 1) and offset < w.offset + max(w.length, 1)
