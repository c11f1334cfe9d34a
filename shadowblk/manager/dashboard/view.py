"""One reading of the fleet that the dashboard, the alert rules and /metrics all look at.

Taken on the store thread once a second (`FleetReader.read`), so the three never disagree and
the store is read once, not once per consumer. The event log is tailed by sequence number:
switchovers are kept for the timeline and counted for /metrics without re-reading the log.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from shadowblk.manager.store import Store
from shadowblk.manager.store.model import Event, Server, ServerState, Volume

TIMELINE_LENGTH = 200
# switchover pause bucket bounds in seconds: the goal is milliseconds; seconds is a failure
PAUSE_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
# with the predictor's decisions to move a server's primaries (manager/risk.py)
SWITCHOVER_KINDS = ("switchover", "switchover-result", "failure-preempt")


@dataclass
class SwitchoverTally:
    """Every switchover result since the manager started, for /metrics."""

    outcomes: Counter[str] = field(default_factory=Counter)
    pause_counts: list[int] = field(default_factory=lambda: [0] * (len(PAUSE_BOUNDS_S) + 1))
    pause_sum_seconds: float = 0.0

    def add(self, detail: dict[str, Any]) -> None:
        self.outcomes[detail.get("outcome", "unknown")] += 1
        pause = detail.get("pause_seconds")
        if isinstance(pause, int | float):
            i = next((i for i, b in enumerate(PAUSE_BOUNDS_S) if pause <= b), len(PAUSE_BOUNDS_S))
            self.pause_counts[i] += 1
            self.pause_sum_seconds += pause


@dataclass
class FleetView:
    """The fleet at one moment: servers, volumes, and the recent switchovers."""

    at: float
    servers: list[Server]
    volumes: list[Volume]
    switchovers: list[Event]  # newest last
    tally: SwitchoverTally

    def server(self, name: str) -> Server | None:
        return next((s for s in self.servers if s.name == name), None)

    def up(self, name: str) -> bool:
        server = self.server(name)
        return server is not None and server.state is not ServerState.DOWN

    def volume_health(self, volume: Volume) -> dict[str, Any]:
        """What VOLUME's primary last reported about it ({} before its first report)."""
        server = self.server(volume.primary)
        return (server.health.get("volumes") or {}).get(volume.name, {}) if server else {}

    def last_switchover_result(self, volume: str) -> Event | None:
        return next(
            (
                e
                for e in reversed(self.switchovers)
                if e.kind == "switchover-result" and e.subject == volume
            ),
            None,
        )


class FleetReader:
    """Reads FleetViews from a store, remembering where it is in the event log."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._seq = 0
        self._timeline: deque[Event] = deque(maxlen=TIMELINE_LENGTH)
        self._tally = SwitchoverTally()

    def read(self) -> FleetView:
        """The fleet now (call it on the store thread)."""
        for event in self.store.events(self._seq):
            self._seq = max(self._seq, event.seq)
            if event.kind in SWITCHOVER_KINDS:
                self._timeline.append(event)
                if event.kind == "switchover-result":
                    self._tally.add(event.detail)
        return FleetView(
            at=time.time(),
            servers=self.store.list_servers(),
            volumes=self.store.list_volumes(),
            switchovers=list(self._timeline),
            tally=self._tally,
        )
