"""Scrub: re-read every block of a volume, check it against its recorded crc32c, and repair
the bad side from the good one (read-repair), recording every discrepancy.

`scrub_one` checks one side against its own map (repair needs a `repair_from` reader for the
good copy: a peer file, a shadow over the network). `scrub_pair` checks two sides of one
volume and lets `truth.decide` say, block by block, which side holds the truth. Both return a
`ScrubReport` whose `exit_code` is what cron sees: 0 clean, 1 found and all repaired,
2 found and something left unrepaired.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from shadowblk.integrity.checksum_map import ChecksumMap, ReadBlock
from shadowblk.integrity.crc_scan import checksum_file
from shadowblk.integrity.discrepancies import Discrepancy, DiscrepancyLog
from shadowblk.integrity.rate_limit import TokenBucket
from shadowblk.integrity.truth import SideView, decide

Progress = Callable[[int], None]


@dataclass
class Side:
    """One copy of a volume: its data file and its checksum map."""

    name: str
    image: Path
    map: ChecksumMap

    def read(self, offset: int, length: int) -> bytes:
        with self.image.open("rb") as f:
            f.seek(offset)
            return f.read(length)


@dataclass
class ScanOptions:
    """How a scan reads: rate limit in bytes/s (None: unlimited), O_DIRECT, cache dropping."""

    rate: float | None = None
    direct: bool = False
    drop_cache: bool = True
    progress: Progress | None = None


@dataclass
class ScrubReport:
    volume: str
    bytes_scanned: int = 0
    seconds: float = 0.0
    discrepancies: list[Discrepancy] = field(default_factory=list)

    @property
    def repaired(self) -> int:
        return sum(d.repaired for d in self.discrepancies)

    @property
    def unrepaired(self) -> int:
        return len(self.discrepancies) - self.repaired

    @property
    def exit_code(self) -> int:
        if not self.discrepancies:
            return 0
        return 1 if not self.unrepaired else 2

    def as_dict(self, record: Path, rebuilt: list[str] | None = None) -> dict[str, Any]:
        """The report as `shadowblk scrub --json` prints it."""
        return {
            "volume": self.volume,
            "bytes_scanned": self.bytes_scanned,
            "seconds": round(self.seconds, 3),
            "rebuilt_maps": rebuilt or [],
            "discrepancies": [{**asdict(d), "block": d.block} for d in self.discrepancies],
            "repaired": self.repaired,
            "unrepaired": self.unrepaired,
            "record": str(record),
            "exit_code": self.exit_code,
        }


def scan(side: Side, options: ScanOptions) -> dict[int, int]:
    """{block index: crc of its data now} for every block whose data differs from its map."""
    cmap = side.map
    rate = TokenBucket(options.rate) if options.rate else None
    got = checksum_file(
        side.image,
        cmap.block_size,
        direct=options.direct,
        drop_cache=options.drop_cache,
        rate=rate,
        progress=options.progress,
    )
    if len(got) != cmap.blocks:
        raise ValueError(f"{side.image} is {len(got)} blocks now, its map has {cmap.blocks}")
    bad = np.nonzero(got != cmap.crcs)[0]
    return dict(zip(bad.tolist(), got[bad].tolist(), strict=True))


def write_block(image: Path, offset: int, data: bytes) -> None:
    """Rewrite one block in place, durably."""
    fd = os.open(image, os.O_WRONLY)
    try:
        if os.pwrite(fd, data, offset) != len(data):
            raise OSError(f"{image}: short write at {offset}")
        os.fsync(fd)
    finally:
        os.close(fd)


def _block_crc(data: bytes, block_size: int) -> int:
    return crc32c.crc32c(data.ljust(block_size, b"\0"))


def scrub_one(
    side: Side,
    options: ScanOptions,
    log: DiscrepancyLog,
    server: str | None = None,
    repair_from: ReadBlock | None = None,
) -> ScrubReport:
    """Scrub one side against its own map; with `repair_from`, rewrite each bad block from the
    good copy, but only if that copy matches the recorded crc."""
    report = ScrubReport(str(side.image))
    started = time.monotonic()
    cmap = side.map
    bs = cmap.block_size
    bad = {} if cmap.rebuilt_reason else scan(side, options)
    for block, actual in sorted(bad.items()):
        offset, expected = block * bs, int(cmap.crcs[block])
        length = min(bs, cmap.size - offset)
        repaired = False
        if repair_from is not None:
            good = repair_from(offset, length)
            if len(good) == length and _block_crc(good, bs) == expected:
                write_block(side.image, offset, good)
                repaired = True
        detail = "" if repaired or repair_from is None else "the good copy did not match either"
        report.discrepancies.append(
            Discrepancy(
                server=server or socket.gethostname(),
                volume=report.volume,
                offset=offset,
                block_size=bs,
                side=side.name,
                kind="data",
                repaired=repaired,
                expected_crc=expected,
                actual_crc=actual,
                detail=detail,
            )
        )
    report.bytes_scanned = cmap.size
    report.seconds = time.monotonic() - started
    log.append(report.discrepancies)
    return report


def scrub_pair(
    primary: Side,
    shadow: Side,
    options: ScanOptions,
    log: DiscrepancyLog,
    repair: bool,
    server: str | None = None,
) -> ScrubReport:
    """Scrub both sides of a volume and repair each bad block from the side holding the truth."""
    pm, sm = primary.map, shadow.map
    if (pm.size, pm.block_size) != (sm.size, sm.block_size):
        raise ValueError(
            f"{primary.image} and {shadow.image} are not copies of one volume: "
            f"{pm.size}/{pm.block_size} vs {sm.size}/{sm.block_size} bytes/block size"
        )
    if repair and not (pm.writable and sm.writable):
        raise ValueError("repairing needs both maps opened writable")
    report = ScrubReport(str(primary.image))
    started = time.monotonic()
    bad = {s.name: {} if s.map.rebuilt_reason else scan(s, options) for s in (primary, shadow)}
    candidates = set(bad[primary.name]) | set(bad[shadow.name])
    candidates |= set(np.nonzero(pm.crcs != sm.crcs)[0].tolist())
    sides = {primary.name: primary, shadow.name: shadow}
    for block in sorted(candidates):
        views = [
            SideView(
                s.name,
                bad[s.name].get(block, int(s.map.crcs[block])),
                int(s.map.crcs[block]),
                s.map.epoch,
                s.map.rebuilt_reason is not None,
            )
            for s in (primary, shadow)
        ]
        report.discrepancies += _resolve(block, views, sides, repair, report.volume, server)
    if repair and not report.unrepaired and pm.epoch != sm.epoch:
        older = min((pm, sm), key=lambda m: m.epoch)
        older.set_epoch(max(pm.epoch, sm.epoch))
    # a side whose map was just rebuilt was read by the rebuild, not by this scan
    report.bytes_scanned = sum(s.map.size for s in (primary, shadow) if not s.map.rebuilt_reason)
    report.seconds = time.monotonic() - started
    log.append(report.discrepancies)
    return report


def _resolve(
    block: int,
    views: list[SideView],
    sides: dict[str, Side],
    repair: bool,
    volume: str,
    server: str | None,
) -> list[Discrepancy]:
    """Decide one candidate block, repair it if asked, and say what was found."""
    bs = next(iter(sides.values())).map.block_size
    offset = block * bs
    host = server or socket.gethostname()
    verdict = decide(*views)
    record = partial(Discrepancy, server=host, volume=volume, offset=offset, block_size=bs)
    if not verdict.resolved:
        return [
            record(
                side="both",
                kind="unresolved",
                repaired=False,
                expected_crc=None,
                actual_crc=views[0].actual,
                detail=verdict.reason,
            )
        ]
    found = []
    source = sides[verdict.source]
    length = min(bs, source.map.size - offset)
    for fix in verdict.fixes:
        target = sides[fix.side]
        view = next(v for v in views if v.name == fix.side)
        repaired = repair
        if repair and fix.data:
            good = source.read(offset, length)
            repaired = _block_crc(good, bs) == verdict.truth
            if repaired:
                write_block(target.image, offset, good)
        if repaired:
            target.map.crcs[block] = verdict.truth
        found.append(
            record(
                side=fix.side,
                kind=fix.kind,
                repaired=repaired,
                expected_crc=verdict.truth,
                actual_crc=view.actual,
                detail=verdict.reason,
            )
        )
    return found
