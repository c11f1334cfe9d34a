"""Scrub of a volume while `serve` exports it: runs inside the server, next to the write path.

Why inside: the server holds the checksum map (exclusive flock) and keeps writing the volume;
only it can read a block and its map entry at one point in the write order. The primary is
read in windows with the tracker's `ordering` lock held for each (the lock every write holds
from its observers, which update the map, through the volume change), so no write lands
between the read and the check, and a mismatch is rot, never a write in flight. The lock is
held for one window's pread and crc (WINDOW bytes), so writes wait at most that long, and only
while a scrub runs: nothing on the write path changes.

The shadow checks its own image against its own map (SCAN on its verify port). Repairs:

- a bad primary block is read from the shadow (READ, which the shadow answers only for data
  that matches its map), accepted only if it matches the primary's recorded crc, and written
  under `ordering`, if no write changed the block's entry meanwhile;
- a bad shadow block is shipped again: the primary's block (checked against its map) is shown
  to the tracker as a write of itself, under `ordering`, so the replication resends it with the
  next epoch and the shadow's applier rewrites it and its map entry.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from shadowblk.integrity.blockcrc import block_crc32c
from shadowblk.integrity.checksum_map import ChecksumMap
from shadowblk.integrity.discrepancies import Discrepancy, DiscrepancyLog
from shadowblk.integrity.rate_limit import TokenBucket
from shadowblk.integrity.scrub import ScrubReport
from shadowblk.integrity.tree_client import TreeClient
from shadowblk.integrity.tree_wire import WireError
from shadowblk.nbd.backend import Backend
from shadowblk.tracking.tracker import WriteTracker

WINDOW = 1 << 20

Progress = Callable[[str, int], None]  # (phase, bytes done since the last call)


class ScrubStopped(Exception):
    """The server is stopping: the scrub ends unfinished."""


@dataclass
class LiveVolume:
    """What a live scrub needs from the server: the write order, the volume and its map."""

    name: str
    tracker: WriteTracker
    backend: Backend
    map: ChecksumMap


class LiveScrub:
    """One scrub run of a served volume (and, with a shadow's verify port, of that shadow)."""

    def __init__(
        self,
        volume: LiveVolume,
        log: DiscrepancyLog,
        server: str | None,
        stop: threading.Event,
        progress: Progress,
    ) -> None:
        self.volume = volume
        self.log = log
        self.stop = stop
        self.progress = progress
        self.bs = volume.map.block_size
        self.size = volume.map.size
        self.record = partial(
            Discrepancy,
            server=server or socket.gethostname(),
            volume=volume.name,
            block_size=self.bs,
        )

    def run(self, repair: bool, rate: float | None, shadow: TreeClient | None) -> ScrubReport:
        report = ScrubReport(self.volume.name)
        started = time.monotonic()
        bucket = TokenBucket(rate) if rate else None
        bad = self._scan_primary(bucket)
        report.bytes_scanned = self.size
        shadow_bad: dict[int, tuple[int, int]] = {}
        if shadow is not None:
            shadow.open(self.volume.name)
            # a silent shadow must not hold the scrub (and refuse every later one) for ever:
            # its whole-image read at RATE, or at a slow disk's 20 MB/s, plus a margin
            timeout = 600 + self.size / (rate or 20e6)
            entries, complete = shadow.scan(int(rate or 0), timeout=timeout)
            shadow_bad = {block: (data, entry) for block, data, entry in entries}
            report.bytes_scanned += self.size
            self.progress("shadow", self.size)
            if self.stop.is_set():
                raise ScrubStopped("the server is stopping")
            if not complete:
                raise WireError("the shadow found more bad blocks than one SCAN reply holds")
        for block, actual in sorted(bad.items()):
            if block in shadow_bad:
                found = self._unresolved(block, actual)
            else:
                found = self._repair_primary(block, actual, shadow if repair else None)
            report.discrepancies.append(found)
        for block, (actual, expected) in sorted(shadow_bad.items()):
            if block not in bad:
                report.discrepancies.append(self._reship(block, actual, expected, repair))
        report.seconds = time.monotonic() - started
        self.log.append(report.discrepancies)
        return report

    def _crcs(self, data: bytes) -> np.ndarray:
        padded = data.ljust(-(-len(data) // self.bs) * self.bs, b"\0")
        return block_crc32c(padded, self.bs)

    def _scan_primary(self, bucket: TokenBucket | None) -> dict[int, int]:
        """{block: crc of its data} for each block whose data differs from its map entry, each
        window read and checked with no write in between."""
        bad: dict[int, int] = {}
        vol = self.volume
        for start in range(0, self.size, WINDOW):
            if self.stop.is_set():
                raise ScrubStopped("the server is stopping")
            length = min(WINDOW, self.size - start)
            if bucket is not None:
                bucket.take(length)
            first = start // self.bs
            with vol.tracker.ordering:
                crcs = self._crcs(vol.backend.pread(start, length))
                entries = np.array(vol.map.crcs[first : first + len(crcs)])
            for i in np.nonzero(crcs != entries)[0].tolist():
                bad[first + i] = int(crcs[i])
            self.progress("primary", length)
        return bad

    def _span(self, block: int) -> tuple[int, int]:
        offset = block * self.bs
        return offset, min(self.bs, self.size - offset)

    def _unresolved(self, block: int, actual: int) -> Discrepancy:
        offset, _ = self._span(block)
        return self.record(
            offset=offset,
            side="both",
            kind="unresolved",
            repaired=False,
            expected_crc=int(self.volume.map.crcs[block]),
            actual_crc=actual,
            detail="the block is bad on the primary and on the shadow",
        )

    def _repair_primary(self, block: int, actual: int, shadow: TreeClient | None) -> Discrepancy:
        """Rewrite a rotted primary block from the shadow's copy, if that copy is the truth."""
        vol = self.volume
        offset, length = self._span(block)
        expected = int(vol.map.crcs[block])
        repaired, detail = False, "not repaired (no --repair, or no shadow to repair from)"
        if shadow is not None:
            try:
                good = shadow.read(offset, length)
            except (WireError, OSError) as exc:
                good, detail = b"", f"the shadow could not give the block: {exc}"
            if good and int(self._crcs(good)[0]) != expected:
                detail = "the shadow's copy is another version of the block (lagging?)"
            elif good:
                repaired, detail = self._write_back(block, offset, good, expected)
        return self.record(
            offset=offset,
            side="primary",
            kind="data",
            repaired=repaired,
            expected_crc=expected,
            actual_crc=actual,
            detail=detail,
        )

    def _write_back(self, block: int, offset: int, good: bytes, expected: int) -> tuple[bool, str]:
        vol = self.volume
        with vol.tracker.ordering:
            if int(vol.map.crcs[block]) != expected:  # a write replaced it since the scan
                now = int(self._crcs(vol.backend.pread(offset, len(good)))[0])
                consistent = now == int(vol.map.crcs[block])
                return consistent, "overwritten by a write since the scan"
            vol.backend.pwrite(good, offset)
            vol.backend.flush()
        return True, "rewritten from the shadow"

    def _reship(self, block: int, actual: int, expected: int, repair: bool) -> Discrepancy:
        """Ship the primary's copy of a block that rotted on the shadow again."""
        vol = self.volume
        offset, length = self._span(block)
        repaired, detail = False, "not repaired (no --repair)"
        if repair:
            with vol.tracker.ordering:
                data = vol.backend.pread(offset, length)
                if int(self._crcs(data)[0]) != int(vol.map.crcs[block]):
                    detail = "the primary's copy does not match its map either"
                else:
                    try:
                        vol.tracker.before_write(offset, data)
                        repaired, detail = True, "shipped again from the primary"
                    except Exception as exc:  # an observer refused it (fenced, replication down)
                        detail = f"the primary could not ship it: {exc}"
        return self.record(
            offset=offset,
            side="shadow",
            kind="data",
            repaired=repaired,
            expected_crc=expected,
            actual_crc=actual,
            detail=detail,
        )
