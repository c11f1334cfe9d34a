"""Checksum discrepancies into the agent's counters: what scrubs and verifies of this server's
primaries recorded (each state folder's discrepancies.jsonl) reaches the heartbeat, so the
manager's failure predictor and the dashboard see it.

Each log only grows (appended, fsynced), so the feed reads what was added since its last look
and counts the complete lines per volume; the counters are cumulative, as the manager expects.
"""

from __future__ import annotations

import os
from pathlib import Path

from shadowblk.agent.metrics import AgentMetrics
from shadowblk.integrity.discrepancies import FILENAME


class DiscrepancyFeed:
    """Counts new discrepancy records under PRIMARIES_DIR/*.state into METRICS."""

    def __init__(self, primaries_dir: Path, metrics: AgentMetrics) -> None:
        self.primaries_dir, self.metrics = primaries_dir, metrics
        self.read_to: dict[Path, int] = {}  # log -> the offset after its last complete line

    def poll(self) -> None:
        logs = set(self.primaries_dir.glob(f"*.state/{FILENAME}"))
        for gone in self.read_to.keys() - logs:  # volumes dropped since the last look
            del self.read_to[gone]
        for log in logs:
            volume = log.parent.name.removesuffix(".state")
            new = self._new_lines(log)
            if new:
                self.metrics.add_discrepancies(volume, new)

    def _new_lines(self, log: Path) -> int:
        start = self.read_to.get(log, 0)
        try:
            with open(log, "rb") as f:
                if os.fstat(f.fileno()).st_size < start:  # replaced by a shorter one: anew
                    start = 0
                f.seek(start)
                added = f.read()
        except FileNotFoundError:  # the volume was dropped meanwhile
            self.read_to.pop(log, None)
            return 0
        complete = added.rfind(b"\n") + 1  # a torn last line is counted once it is whole
        self.read_to[log] = start + complete
        return added.count(b"\n", 0, complete)
