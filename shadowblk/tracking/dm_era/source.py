"""dm-era as a delta source: the blocks the kernel saw written, read into the shipper's epochs.

A pass reads which blocks were written since the last pass (from a metadata snapshot, or from
the live metadata while the target is suspended), reads those blocks and hands them to the
Replicator (`on_write`), like writes the NBD server captured in-band. Unlike in-band capture,
the data is read after the fact, so an ordinary pass is not a point-in-time image: its data
stays in the open epoch, and only a *suspended* pass cuts the epoch. That pass suspends the
origin (in-flight I/O completes, new I/O waits), reads the last few blocks straight from the
origin device, resumes, captures them and cuts: the epoch it closes holds every block written
since the previous pass with its value at the suspension, so the shadow moves from one exact past
state of the origin to the next (I1). The shadow is reported `resyncing` until such a pass, begun
after the shadow's own full sync or resync read, has been applied by every shadow.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shadowblk.delta.primary_state import write_json
from shadowblk.delta.replicator import Replicator
from shadowblk.tracking.dm_era.metadata import EraMetadata
from shadowblk.tracking.dm_era.target import EraTarget

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read and captured at a time


@dataclass(frozen=True)
class PassReport:
    """One pass: eras [since, until) read, what was captured, and the pause if suspended."""

    since: int
    until: int
    blocks: int
    bytes: int
    suspended: bool
    pause_ms: float
    epoch: int | None  # the epoch a suspended pass cut


def extents(md: EraMetadata, since: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) runs written since era SINCE, within SIZE bytes, at most CHUNK long."""
    for offset, length in md.written_extents(since, size):
        for start in range(offset, offset + length, CHUNK):
            yield start, min(CHUNK, offset + length - start)


class EraSource:
    """Feeds one Replicator from one era target; `since` (the first era not read yet) is kept
    in STATE, a small JSON file, after every pass: what a pass captured is already in the
    shadows' durable lacks bitmaps, so a restart resumes from there without a full copy."""

    def __init__(self, target: EraTarget, replicator: Replicator, state: Path) -> None:
        self.target = target
        self.rep = replicator
        self.state = state
        if target.status().snapshot is not None:  # left by a tracker that died mid-pass
            target.drop_snapshot()
        self.since = self._load()
        self.passes: list[PassReport] = []
        self.consistent_epoch: int | None = None  # cut by the last suspended pass that counts
        self._links_at_cut: dict[str, int] = {}  # shadow -> its reconnect count at that pass

    def _load(self) -> int:
        if self.state.exists():
            return int(json.loads(self.state.read_text())["since"])
        return self.target.status().current_era  # new: the shadows get a full sync first

    def _save(self) -> None:
        write_json(self.state, {"since": self.since})  # durable: a torn file would stop a restart

    def _read(self, fd: int, md: EraMetadata) -> Iterator[tuple[int, bytes]]:
        for offset, length in extents(md, self.since, self.rep.size):
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise OSError(f"short read of {self.target.name} at {offset}")
            yield offset, data

    def _capture(self, blocks: Iterator[tuple[int, bytes]], block_size: int) -> tuple[int, int]:
        nbytes = 0
        for offset, data in blocks:
            self.rep.on_write(offset, data)
            nbytes += len(data)
        return -(-nbytes // block_size), nbytes

    def run_pass(self, suspended: bool) -> PassReport:
        """One pass; SUSPENDED: the one that ends with the origin briefly suspended."""
        return self._suspended_pass() if suspended else self._live_pass()

    def _live_pass(self) -> PassReport:
        cut_before = self.rep.last_cut
        self.target.take_snapshot()
        try:
            md = EraMetadata.open(self.target.metadata, snapshot=True)
            fd = os.open(self.target.device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                blocks, nbytes = self._capture(self._read(fd, md), md.block_size)
            finally:
                os.close(fd)
        finally:
            self.target.drop_snapshot()
        if self.rep.last_cut != cut_before:  # back-pressure cut a fuzzy epoch
            self.consistent_epoch = None
        return self._done(PassReport(self.since, md.current_era, blocks, nbytes, False, 0.0, None))

    def _suspended_pass(self) -> PassReport:
        links = {s["address"]: s for s in self.rep.status()["shadows"]}
        synced = all(s["phase"] == "streaming" for s in links.values())
        fd = os.open(self.target.origin, os.O_RDONLY | os.O_CLOEXEC)
        try:
            start = time.monotonic()
            self.target.suspend()
            try:
                md = EraMetadata.open(self.target.metadata, snapshot=False)
                # the era target wrote around the origin's page cache: read what is on disk
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                data = list(self._read(fd, md))
            finally:
                self.target.resume()
            pause_ms = (time.monotonic() - start) * 1000
        finally:
            os.close(fd)
        # captured after the resume: only this thread feeds the open epoch, and the writes
        # since the resume are left to the next pass, so the cut is the origin at the suspension
        # (and the capture, which may wait for the shadows, never holds the origin suspended)
        blocks, nbytes = self._capture(iter(data), md.block_size)
        epoch = self.rep.cut_epoch()
        if synced:
            self.consistent_epoch = epoch
            self._links_at_cut = {a: s["reconnects"] for a, s in links.items()}
        # the suspend archived era E without starting a new one; the resume started E + 1
        until = md.current_era + 1
        return self._done(PassReport(self.since, until, blocks, nbytes, True, pause_ms, epoch))

    def _done(self, report: PassReport) -> PassReport:
        self.since = report.until
        self._save()
        self.passes.append(report)
        log.info("dm-era pass: %s", report)
        return report

    def in_sync(self) -> bool:
        """Every shadow applied the last suspended pass's epoch, nothing fuzzy was cut since,
        and no shadow reconnected (and so resynced) since."""
        epoch = self.consistent_epoch
        if epoch is None or self.rep.last_cut != epoch:
            return False
        shadows = self.rep.status()["shadows"]
        return all(
            s["acked_epoch"] >= epoch
            and s["phase"] == "streaming"
            and self._links_at_cut.get(s["address"]) == s["reconnects"]
            for s in shadows
        )

    def status(self) -> dict[str, Any]:
        return {
            "target": self.target.name,
            "state": "in-sync" if self.in_sync() else "resyncing",
            "since_era": self.since,
            "consistent_epoch": self.consistent_epoch,
            "passes": len(self.passes),
            "suspended_passes": sum(p.suspended for p in self.passes),
            "last_pass": asdict(self.passes[-1]) if self.passes else None,
            "max_pause_ms": max((p.pause_ms for p in self.passes if p.suspended), default=0.0),
        }

    def follow(self, stop: threading.Event, interval: float, suspend_every: int) -> None:
        """Passes every INTERVAL seconds, every SUSPEND_EVERY-th one suspended, until STOP;
        then a last suspended pass, so that the shadows end at the origin's final state."""
        n = 0
        while not stop.wait(interval):
            n += 1
            self.run_pass(suspended=n % suspend_every == 0)
        self.run_pass(suspended=True)
