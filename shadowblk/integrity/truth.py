"""Which side of a volume holds the truth for one block, when two sides disagree.

Evidence: each side's data (the crc32c of what is on disk now) and each side's map record
(the crc32c written on the write/apply path). A record counts as evidence only if its map
was loaded as saved (a rebuilt map merely repeats its data), and, when the two maps cover
different epochs, only the newer map's record counts (the older side is behind, not right).

The truth is the one crc value that some side's data holds AND a trusted record confirms.
Sides whose data differ from it get their data rewritten from a side that holds it; sides
whose record differs get their record corrected. Unresolved, reported and left alone:
no data matches a trusted record; both sides' data match trusted records but differ
(diverged, same epoch); or the fix would overwrite the data of a side whose map was rebuilt
(its history is lost: rot and newer writes look the same).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SideView:
    """What one side shows for a block."""

    name: str
    actual: int
    recorded: int
    epoch: int
    map_rebuilt: bool = False

    @property
    def consistent(self) -> bool:
        return self.actual == self.recorded


@dataclass(frozen=True)
class Fix:
    """One side's correction: `data` is rewritten from `source`, or only the record is."""

    side: str
    kind: str  # "data", "map" or "stale"
    data: bool


@dataclass(frozen=True)
class Verdict:
    truth: int | None
    source: str | None
    fixes: tuple[Fix, ...]
    reason: str

    @property
    def resolved(self) -> bool:
        return self.truth is not None


def decide(a: SideView, b: SideView) -> Verdict:
    """The truth for one block seen by sides a and b (see the module docstring)."""
    trusted = [s for s in (a, b) if not s.map_rebuilt]
    if len(trusted) == 2 and a.epoch != b.epoch:
        trusted = [max(trusted, key=lambda s: s.epoch)]
    records = {s.recorded for s in trusted}
    candidates = {s.actual for s in (a, b)} & records
    if not candidates:
        return Verdict(None, None, (), "no side's data matches a trusted map record")
    if len(candidates) > 1:
        return Verdict(None, None, (), "both sides match their records but differ (diverged)")
    truth = candidates.pop()
    holders = [s for s in (a, b) if s.actual == truth]
    source = max(holders, key=lambda s: s.recorded == truth)
    fixes = []
    for side in (a, b):
        if side.actual == truth and side.recorded == truth:
            continue
        other = b if side is a else a
        if side.actual != truth and side.map_rebuilt:
            return Verdict(
                None, None, (), f"{side.name}'s map was rebuilt: cannot tell rot from newer writes"
            )
        kind = "stale" if side.epoch < other.epoch else "data" if side.actual != truth else "map"
        fixes.append(Fix(side.name, kind, data=side.actual != truth))
    reason = "; ".join(f"{f.side}: {f.kind}" for f in fixes) or "consistent"
    return Verdict(truth, source.name, tuple(fixes), reason)
