"""The recent past of the numbers a person would rather see plotted: replication lag per
shadow, I/O latency (p99) and failure probability per server. Kept in memory, ten minutes at
one sample a second; a new manager starts with an empty past."""

from __future__ import annotations

from collections import deque
from typing import Any

from shadowblk.manager.dashboard.view import FleetView

SAMPLES = 600


def sample(view: FleetView) -> dict[str, Any]:
    """The plotted numbers of VIEW: {t, lag: {"VOL→SHADOW": s}, p99_ms: {...}, fp: {...}}."""
    lag = {}
    for v in view.volumes:
        for shadow, s in view.volume_health(v).get("shadows", {}).items():
            lag[f"{v.name}→{shadow}"] = s.get("lag_seconds", 0.0)
    return {
        "t": round(view.at, 3),
        "lag": lag,
        "p99_ms": {
            s.name: (s.health.get("latency_ms") or {}).get("p99", 0.0) for s in view.servers
        },
        "fp": {s.name: s.failure_probability for s in view.servers},
    }


def _p99(health: dict[str, Any]) -> float:
    return (health.get("latency_ms") or {}).get("p99", 0.0)


class History:
    """The last SAMPLES samples, oldest first."""

    def __init__(self, size: int = SAMPLES) -> None:
        self.samples: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, view: FleetView) -> dict[str, Any]:
        point = sample(view)
        self.samples.append(point)
        return point
