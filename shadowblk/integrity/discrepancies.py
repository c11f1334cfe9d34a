"""The discrepancy log: every checksum disagreement a scrub or verify finds, appended as one
JSON line, where the failure predictor and the dashboard read them back.

One file per state directory (`discrepancies.jsonl`); lines are appended with O_APPEND and
fsynced, so concurrent writers never interleave and a crash loses at most a torn last line,
which readers skip with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FILENAME = "discrepancies.jsonl"


@dataclass(frozen=True)
class Discrepancy:
    """One block on one side that did not hold the truth (or a block nobody could resolve)."""

    server: str
    volume: str
    offset: int
    block_size: int
    side: str  # the side in error, "both" when unresolved
    kind: str  # "data", "map", "stale" or "unresolved"
    repaired: bool
    expected_crc: int | None
    actual_crc: int
    detail: str = ""
    time: float = field(default_factory=time.time)

    @property
    def block(self) -> int:
        return self.offset // self.block_size


class DiscrepancyLog:
    """Append-only JSON lines at `path`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str]) -> DiscrepancyLog:
        return cls(Path(state_dir) / FILENAME)

    def append(self, records: Iterable[Discrepancy]) -> int:
        """Append records durably; returns how many were written."""
        lines = [
            json.dumps({**asdict(r), "block": r.block}, sort_keys=True) + "\n" for r in records
        ]
        if not lines:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(lines).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return len(lines)

    def read(self) -> Iterator[Discrepancy]:
        """Every record so far, oldest first; torn or foreign lines are skipped with a warning."""
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    fields = json.loads(line)
                    fields.pop("block", None)
                    yield Discrepancy(**fields)
                except (ValueError, TypeError) as exc:
                    log.warning("%s:%d: skipping an unreadable record (%s)", self.path, number, exc)
