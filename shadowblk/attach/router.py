"""The router: every client request goes to the current upstream, through a gate.

The gate is what turns a switchover into a pause instead of an error. A planned repoint
connects to the new primary first, then closes the gate (new requests queue), waits for the
in-flight ones to drain, swaps, and opens the gate again. A request whose upstream drops
mid-flight is held (the gate closes by itself) and retried on the next upstream once a repoint
opens the gate; only a request held longer than the hold time gets EIO. Writes re-issued on the
new primary are safe (a block write is idempotent), and every retry goes to the upstream current
at that moment, so a READ after a repoint is always answered by the new primary. After a lost
upstream the writes answered since the last FLUSH are replayed on the new one with the gate
already open; a request that could see or undo one not yet replayed waits for it (replay.py).
So are they when the manager asks (an emergency: the old primary may have vanished silently),
when the drain times out, and on every repoint the follower makes (see `repoint`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from typing import Any

from shadowblk.attach.replay import Replay, plan
from shadowblk.attach.unflushed import Unflushed
from shadowblk.attach.upstream import LOST, Done, Target, Upstream, UpstreamError
from shadowblk.nbd import protocol as P

log = logging.getLogger(__name__)

WRITES = (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM)
PLAN_AFTER_S = 0.05  # after the upstream was lost: plan the replay (an emergency lasts seconds)

# transmission flags the router can pass on to its clients (no DF: no structured replies)
PASSED_FLAGS = (
    P.TFLAG_HAS_FLAGS
    | P.TFLAG_READ_ONLY
    | P.TFLAG_SEND_FLUSH
    | P.TFLAG_SEND_FUA
    | P.TFLAG_SEND_TRIM
    | P.TFLAG_SEND_WRITE_ZEROES
    | P.TFLAG_CAN_MULTI_CONN
    | P.TFLAG_SEND_CACHE
    | P.TFLAG_SEND_FAST_ZERO
)


class Refused(Exception):
    """A repoint the router will not do; STATUS is the HTTP status the control API answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Repoint:
    """What one repoint measured, in milliseconds."""

    uri: str
    generation: int
    pause_ms: float  # first request queued -> queue released (0 when nothing was queued)
    gate_closed_ms: float  # gate closed -> gate opened
    drain_ms: float  # gate closed -> in-flight requests finished
    connect_ms: float  # connect and handshake with the new upstream (before the gate closes)
    queued: int  # requests that waited at the gate
    closed_at: float  # time.monotonic() when the gate closed, to place it among other events
    replay_writes: int = 0  # unflushed writes to replay, replayed after the gate opened
    replay_ms: float | None = None  # gate opened -> replay done (None: not yet, or none)

    def to_dict(self) -> dict:
        return asdict(self)


class Router:
    """One volume's stable endpoint over a replaceable upstream connection."""

    def __init__(self, hold_time: float = 30.0, drain_timeout: float = 10.0) -> None:
        self.hold_time = hold_time
        self.drain_timeout = drain_timeout
        self.upstream: Upstream | None = None
        self.generation = -1
        self.size = 0
        self.flags = 0
        self.repoints = 0
        self.requests = 0
        self.errors = 0  # replies with an error sent to clients (upstream's or EIO)
        self.retries = 0
        self.expired = 0  # requests that waited past the hold time
        self.last: Repoint | None = None
        self._open = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._active = 0
        self._waiting = 0
        self._first_queued: float | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._pauses = 0  # the latest pause's number: only it may reopen the gate by itself
        self.unflushed = Unflushed()
        self._lost = False  # an upstream was lost: replay the unflushed writes on the next
        self._replay: Replay | None = None  # running on the current upstream, gate open
        self._replayed_on: Upstream | None = None  # its repoint left no unflushed write behind
        self._planned: tuple[tuple[int, int, int], Any] | None = None  # (log version, plan)
        self.replayed = 0
        self.replay_waits = 0  # client requests that waited for a block being replayed

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    @property
    def upstream_uri(self) -> str | None:
        """The export now under the volume (the follower compares it with the manager's)."""
        return str(self.upstream.target) if self.upstream else None

    @property
    def upstream_alive(self) -> bool:
        return self.upstream is not None and not self.upstream.lost.is_set()

    # --- requests ---------------------------------------------------------------------------
    def submit(
        self, cmd: int, flags: int, offset: int, length: int, payload: bytes, done: Done
    ) -> None:
        """Forward one request; DONE(error, data) runs with its reply, whichever upstream gave it.

        The hot path, gate open, is a plain callback chain; a request that must wait (gate
        closed) or be retried (upstream lost) continues as a task in `_held`.
        """
        self.requests += 1
        up = self.upstream
        if not self._open.is_set() or up is None:
            self._spawn(self._held(cmd, flags, offset, length, payload, done, None))
            return
        replaying = self._replay
        if replaying is not None and replaying.blocks(cmd, offset, length):
            self._spawn(self._held(cmd, flags, offset, length, payload, done, None))
            return
        if flags & P.CMD_FLAG_FAST_ZERO and not up.flags & P.TFLAG_SEND_FAST_ZERO:
            done(P.ENOTSUP, b"")  # allowed for a fast zero: the client zeroes the slow way
            return
        self._active += 1
        self._idle.clear()
        mark = self.unflushed.flush_sent() if cmd == P.CMD_FLUSH else 0

        def replied(error: int, data: bytes) -> None:
            self._finished()
            if error in (LOST, P.ESHUTDOWN):
                self._hold(up, error)
                deadline = time.monotonic() + self.hold_time
                self._spawn(self._held(cmd, flags, offset, length, payload, done, deadline))
                return
            if error:
                self.errors += 1
            else:
                self._completed(cmd, flags, offset, length, payload, mark)
            done(error, data)

        up.send(cmd, flags, offset, length, payload, replied)

    def _finished(self) -> None:
        self._active -= 1
        if not self._active:
            self._idle.set()

    def _hold(self, up: Upstream, error: int) -> None:
        """A request came back LOST or ESHUTDOWN (a dropped, fenced or stopping primary)."""
        self.retries += 1
        why = "connection lost" if error == LOST else "ESHUTDOWN"
        self._upstream_lost(up, f"{up.target}: {why}")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _held(
        self,
        cmd: int,
        flags: int,
        offset: int,
        length: int,
        payload: bytes,
        done: Done,
        deadline: float | None,
    ) -> None:
        """The slow path: wait for the gate (up to the hold time) and for the replay of the
        blocks it touches, then retry until answered."""
        while True:
            if not self._open.is_set():
                now = time.monotonic()
                deadline = deadline or now + self.hold_time
                if not await self._wait_open(deadline - now):
                    self.expired += 1
                    self.errors += 1
                    log.warning("request held %.1fs without an upstream: EIO", self.hold_time)
                    done(P.EIO, b"")
                    return
            replaying = self._replay
            if replaying is not None and replaying.blocks(cmd, offset, length):
                self.replay_waits += 1
                await replaying.cleared(cmd, offset, length)
                continue  # the gate again: the replay may have stopped with the upstream lost
            up = self.upstream
            assert up is not None
            if flags & P.CMD_FLAG_FAST_ZERO and not up.flags & P.TFLAG_SEND_FAST_ZERO:
                done(P.ENOTSUP, b"")
                return
            self._active += 1
            self._idle.clear()
            mark = self.unflushed.flush_sent() if cmd == P.CMD_FLUSH else 0
            try:
                error, data = await up.call(cmd, flags, offset, length, payload)
            finally:
                self._finished()
            if error in (LOST, P.ESHUTDOWN):
                self._hold(up, error)
                deadline = deadline or time.monotonic() + self.hold_time
                continue
            if error:
                self.errors += 1
            else:
                self._completed(cmd, flags, offset, length, payload, mark)
            done(error, data)
            return

    def _completed(
        self, cmd: int, flags: int, offset: int, length: int, payload: bytes, mark: int
    ) -> None:
        """Keep a write for replay until a later FLUSH completes (attach/unflushed.py)."""
        if cmd in WRITES:
            self.unflushed.completed(cmd, flags, offset, length, payload)
        elif cmd == P.CMD_FLUSH:
            self.unflushed.flush_done(mark)

    def _start_replay(self, up: Upstream) -> Replay:
        """After a lost upstream: the writes answered since the last FLUSH go to UP, the
        current upstream, beside the clients' requests (replay.py says why that is safe)."""
        if self.unflushed.overflowed_at:
            log.error("failover with more unflushed writes than kept: some may be lost")
        ahead, self._planned = self._planned, None
        ready = ahead[1] if ahead and ahead[0] == self.unflushed.version() else None
        replaying = Replay(list(self.unflushed.writes), up, self._replay_failed, ready)
        self._replay = replaying
        replaying.task.add_done_callback(lambda _: self._replay_ended(replaying))
        return replaying

    def _replay_failed(self, up: Upstream, why: str) -> None:
        """UP dropped a replay write or failed it (EIO, ENOSPC...): as a lost upstream, the
        gate closes and the whole log stays for the next repoint. UP is closed too, so that
        the follower, which sees it no longer alive, repoints (and replays) again."""
        self._upstream_lost(up, why)
        if up is self.upstream:
            self._spawn(up.close())

    def _replay_ended(self, replaying: Replay) -> None:
        self.replayed += replaying.completed
        if self._replay is replaying:
            self._replay = None
        if self.last is not None and self.last.replay_writes and self.last.replay_ms is None:
            self.last.replay_ms = replaying.ms

    async def _settle_replay(self) -> None:
        """Before a pause or a repoint: let a running replay finish (its writes are in-flight
        requests too), up to the drain timeout."""
        replaying = self._replay
        if replaying is not None:
            await asyncio.wait({replaying.task}, timeout=self.drain_timeout)

    async def _wait_open(self, timeout: float) -> bool:
        if self._first_queued is None:
            self._first_queued = time.monotonic()
        self._waiting += 1
        try:
            await asyncio.wait_for(self._open.wait(), max(timeout, 0))
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1

    def _upstream_lost(self, up: Upstream, why: str) -> None:
        if up is self.upstream:
            self._lost = True
        if up is self.upstream and self._open.is_set():
            log.warning("upstream lost, holding requests for up to %.0fs: %s", self.hold_time, why)
            self._open.clear()
            # the requests in flight complete (LOST) first; a log changed since is planned again
            asyncio.get_running_loop().call_later(PLAN_AFTER_S, self._plan_ahead)

    def _plan_ahead(self) -> None:
        """Plan the replay while the gate is closed and no new primary is known yet (the
        repoint then only checks that the log did not change)."""
        if not self._open.is_set() and self.unflushed.writes:
            self._planned = (self.unflushed.version(), plan(self.unflushed.writes))

    async def _watch(self, up: Upstream) -> None:
        """Close the gate as soon as the current upstream drops, even with nothing in flight."""
        await up.lost.wait()
        self._upstream_lost(up, f"{up.target} closed the connection")

    # --- repoint ----------------------------------------------------------------------------
    async def repoint(self, uri: str, generation: int, replay: bool | None = None) -> Repoint:
        """Move every client to URI without an error; refuses an older GENERATION (I3).
        The writes answered since the last FLUSH are replayed on URI when REPLAY is True, or
        the old upstream was lost (it dropped, refused a replay write, or did not drain), or
        REPLAY is None and any are kept. None is the follower's call: it cannot know whether
        the new primary has them (a fence that did not drain, a primary that vanished without
        closing its connection), and a VM FLUSH between its repoint and the manager's push
        (replay: true) would empty the log. Only the manager says False: its planned
        switchover's fence drained, the new primary has every acknowledged write.

        The new upstream is connected and checked before the gate closes, so the pause is the
        drain alone, and a refused or unreachable upstream costs the clients nothing.
        """
        async with self._lock:
            if generation < self.generation:
                raise Refused(
                    409, f"generation {generation} is older than the current {self.generation}"
                )
            try:
                target = Target.parse(uri)
            except UpstreamError as exc:
                raise Refused(422, str(exc)) from None
            if self._already(target, generation, replay) and self.last is not None:
                return self.last  # the follower and the manager's push both bring it
            started = time.monotonic()
            try:
                new = await Upstream.connect(uri)
            except UpstreamError as exc:
                raise Refused(502, str(exc)) from None
            problem = self._unfit(new)
            if problem:
                await new.close()
                raise Refused(409, problem)
            closed = time.monotonic()
            self._open.clear()
            unfinished = self._replay  # on the old upstream: stopped now, redone unless whole
            # it sends nothing more, and waits for its writes in flight beside the drain
            stopped = asyncio.gather(*([unfinished.stop(self.drain_timeout)] if unfinished else []))
            try:
                await asyncio.wait_for(self._idle.wait(), self.drain_timeout)
            except TimeoutError:  # a primary that vanished silently (no FIN/RST): a loss
                log.warning(
                    "in-flight requests did not drain in %.1fs: retried on the new upstream",
                    self.drain_timeout,
                )
                self._lost = True
            await stopped
            if unfinished is not None and not unfinished.whole:
                self._lost = True
            drained = time.monotonic()
            kept = replay is None and bool(self.unflushed.writes)
            again = (self._lost or replay or kept) and self.upstream is not None
            self._lost = False
            old, self.upstream = self.upstream, new
            if old is None:
                self.size, self.flags = new.size, new.flags & PASSED_FLAGS
            self.generation = generation
            self._pauses += 1  # a pause before this repoint is over
            replaying = self._start_replay(new) if again else None
            self._replayed_on = new if again or not self.unflushed.writes else None
            self._spawn(self._watch(new))
            first, self._first_queued = self._first_queued, None
            queued = self._waiting
            self._open.set()
            opened = time.monotonic()
            if old is not None:
                self._spawn(old.close())
            self.repoints += 1
            self.last = Repoint(
                uri=str(new.target),
                generation=generation,
                pause_ms=(opened - first) * 1000 if first is not None else 0.0,
                gate_closed_ms=(opened - closed) * 1000,
                drain_ms=(drained - closed) * 1000,
                connect_ms=(closed - started) * 1000,
                queued=queued,
                closed_at=closed,
                replay_writes=replaying.writes if replaying else 0,
            )
            log.info("repointed to %s generation %d: %s", new.target, generation, self.last)
            return self.last

    async def pause(self, limit: float) -> float:
        """Close the gate and wait for the in-flight requests (the fencing period of a planned
        switchover); the next repoint or resume opens it, or LIMIT seconds do. Drain ms."""
        started = time.monotonic()
        self._open.clear()
        self._pauses += 1
        number = self._pauses
        asyncio.get_running_loop().call_later(limit, self._unpause, number)
        try:
            await asyncio.wait_for(self._idle.wait(), self.drain_timeout)
        except TimeoutError:
            log.warning("in-flight requests did not drain in %.1fs", self.drain_timeout)
        await self._settle_replay()  # unfinished: fenced, it stops; the repoint replays again
        log.info("paused for a switchover")
        return (time.monotonic() - started) * 1000

    def _unpause(self, number: int) -> None:
        if number == self._pauses and not self._open.is_set():
            log.warning("no repoint came after a pause: resuming on the current upstream")
            self.resume()

    def resume(self) -> None:
        """Open the gate on the current upstream (a switchover that did not happen); requests
        it no longer takes are held again until a repoint."""
        self._pauses += 1
        if self.upstream_alive:
            self._open.set()

    def _already(self, target: Target, generation: int, replay: bool | None) -> bool:
        """Already on TARGET at GENERATION, alive, and REPLAY asks for nothing not done (the
        repoint there replayed the log or found it empty, and no replay write failed since): a
        second repoint would only reconnect (and wait for a running replay, gate closed)."""
        up = self.upstream
        return (
            up is not None
            and up.target == target
            and generation == self.generation
            and not up.lost.is_set()
            and (not replay or (self._replayed_on is up and not self._lost))
        )

    def _unfit(self, new: Upstream) -> str:
        """Why NEW cannot replace the current upstream ('' when it can)."""
        if self.upstream is None and self.generation < 0:
            return ""
        if new.size != self.size:
            return f"{new.target} exports {new.size} bytes, the volume has {self.size}"
        # a fast zero may always fail with ENOTSUP, and multi-conn is a hint: neither is needed
        optional = P.TFLAG_READ_ONLY | P.TFLAG_CAN_MULTI_CONN | P.TFLAG_SEND_FAST_ZERO
        needed = self.flags & ~optional
        if needed & ~new.flags:
            return f"{new.target} lacks transmission flags {needed & ~new.flags:#x} in use"
        if new.flags & P.TFLAG_READ_ONLY and not self.flags & P.TFLAG_READ_ONLY:
            return f"{new.target} is read-only"
        return ""

    def status(self) -> dict:
        up = self.upstream
        return {
            "upstream": str(up.target) if up else None,
            "upstream_alive": self.upstream_alive,
            "generation": self.generation,
            "size": self.size,
            "flags": self.flags,
            "paused": self.paused,
            "in_flight": self._active,
            "queued": self._waiting,
            "requests": self.requests,
            "errors": self.errors,
            "retries": self.retries,
            "expired": self.expired,
            "replayed": self.replayed,
            "replaying": self._replay is not None,
            "replay_waits": self.replay_waits,
            "unflushed_bytes": self.unflushed.bytes,
            "repoints": self.repoints,
            "last_repoint": self.last.to_dict() if self.last else None,
        }

    async def close(self) -> None:
        if self.upstream is not None:
            await self.upstream.close()
