"""The writes the VM was answered since its last FLUSH, kept to be replayed after a failover.

A primary acknowledges a write before it is durable (a write-back cache: only a FLUSH, or FUA,
makes it durable, and in `sync` mode that means applied on every in-sync shadow). When the
primary dies, what it acknowledged but never flushed may be missing on the shadow that takes
over, and a FLUSH re-issued there would report as durable writes it never received. So the
router keeps every completed write (WRITE, WRITE_ZEROES, TRIM) until a FLUSH issued after it
completes, and replays them on the new primary, in completion order where two touch the same
block, when it repoints after losing its upstream (attach/replay.py). A planned switchover ships
everything before the shadow is promoted and needs no replay.

Memory is bounded: past LIMIT bytes the log is dropped (until the next FLUSH) and a failover
in that window is logged as unprotected.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

LIMIT = 256 << 20


@dataclass(frozen=True)
class Write:
    seq: int
    cmd: int
    flags: int
    offset: int
    length: int
    payload: bytes


class Unflushed:
    """Completed writes not yet covered by a completed FLUSH."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.writes: list[Write] = []
        self.bytes = 0
        self.overflowed_at = 0  # the mark when the log was dropped; 0: it holds every write
        self._seq = itertools.count(1)

    def completed(self, cmd: int, flags: int, offset: int, length: int, payload: bytes) -> None:
        """A write was answered without error."""
        if self.overflowed_at:
            return
        self.writes.append(Write(next(self._seq), cmd, flags, offset, length, payload))
        self.bytes += len(payload) + 64
        if self.bytes > self.limit:
            log.warning("over %d MiB written since the last FLUSH: not kept for replay",
                        self.limit >> 20)  # fmt: skip
            self.writes, self.bytes, self.overflowed_at = [], 0, next(self._seq)

    def version(self) -> tuple[int, int, int]:
        """What the log holds, in three numbers: writes only join at the end (a higher seq)
        and leave from the start (a FLUSH), so equal versions mean equal logs."""
        if not self.writes:
            return (0, 0, self.overflowed_at)
        return (len(self.writes), self.writes[0].seq, self.writes[-1].seq)

    def flush_sent(self) -> int:
        """A FLUSH is sent now: the mark of what it covers."""
        return next(self._seq)

    def flush_done(self, mark: int) -> None:
        """The FLUSH sent at MARK succeeded: the writes completed before it are durable."""
        self.writes = [w for w in self.writes if w.seq > mark]
        self.bytes = sum(len(w.payload) + 64 for w in self.writes)
        if self.overflowed_at and mark > self.overflowed_at:
            self.overflowed_at = 0
