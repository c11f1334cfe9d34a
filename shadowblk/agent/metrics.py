"""What an agent measures, kept once and read two ways: as Prometheus families for its
`/metrics`, and as the health part of its heartbeat to the manager (docs/monitoring.md).

One plain state feeds both, so the manager's dashboard and an operator's Prometheus never
disagree about a number. The agent's data path calls the `record_*`/`set_*` methods; they are
cheap (a lock, a few additions) because the NBD server calls `observe_io` on every request.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# I/O latency bucket bounds in seconds: 50 µs (page cache) to 10 s (a dying disk's retries)
LATENCY_BOUNDS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
SHADOW_STATES = ("syncing", "in_sync", "stale", "disconnected")


@dataclass
class ShadowStats:
    """How far one shadow of a primary is, as the primary's shipper sees it."""

    state: str = "syncing"
    lag_seconds: float = 0.0
    lag_bytes: int = 0


@dataclass
class VolumeStats:
    """One primary volume hosted by this agent."""

    written_bytes: int = 0
    dirty_bytes: int = 0
    epoch: int = 0
    checksum_discrepancies: int = 0
    shadows: dict[str, ShadowStats] = field(default_factory=dict)


@dataclass
class LatencyHistogram:
    """Non-cumulative counts per bucket of LATENCY_BOUNDS_S, the last one for +Inf."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_S) + 1))
    sum_seconds: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BOUNDS_S, seconds)] += 1
        self.sum_seconds += seconds

    def cumulative(self) -> list[int]:
        total, out = 0, []
        for c in self.counts:
            total += c
            out.append(total)
        return out

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding quantile Q (0 with no observations)."""
        cum = self.cumulative()
        if not cum[-1]:
            return 0.0
        i = bisect.bisect_left(cum, q * cum[-1])
        return LATENCY_BOUNDS_S[min(i, len(LATENCY_BOUNDS_S) - 1)]


class AgentMetrics(Collector):
    """The agent's measurements; register it in a CollectorRegistry (see `registry`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.volumes: dict[str, VolumeStats] = {}
        self.latency: dict[str, LatencyHistogram] = {}  # by operation: read, write, flush
        self.io_errors: dict[str, int] = {}
        self.failure_probability = 0.0
        self.failure_reasons: list[str] = []

    # what the data path reports
    def record_write(self, volume: str, nbytes: int) -> None:
        with self._lock:
            self.volumes.setdefault(volume, VolumeStats()).written_bytes += nbytes

    def set_volume(self, volume: str, *, dirty_bytes: int, epoch: int) -> None:
        with self._lock:
            stats = self.volumes.setdefault(volume, VolumeStats())
            stats.dirty_bytes, stats.epoch = dirty_bytes, epoch

    def set_shadow(
        self, volume: str, shadow: str, state: str, lag_seconds: float, lag_bytes: int
    ) -> None:
        if state not in SHADOW_STATES:
            raise ValueError(f"shadow state {state!r} is not one of {SHADOW_STATES}")
        with self._lock:
            stats = self.volumes.setdefault(volume, VolumeStats())
            stats.shadows[shadow] = ShadowStats(state, lag_seconds, lag_bytes)

    def drop_volume(self, volume: str) -> None:
        with self._lock:
            self.volumes.pop(volume, None)

    def observe_io(self, op: str, seconds: float, error: bool = False) -> None:
        with self._lock:
            self.latency.setdefault(op, LatencyHistogram()).observe(seconds)
            if error:
                self.io_errors[op] = self.io_errors.get(op, 0) + 1

    def add_discrepancies(self, volume: str, count: int) -> None:
        with self._lock:
            self.volumes.setdefault(volume, VolumeStats()).checksum_discrepancies += count

    def set_failure(self, probability: float, reasons: list[str]) -> None:
        with self._lock:
            self.failure_probability, self.failure_reasons = probability, list(reasons)

    # the two readings
    def collect(self) -> Iterator[Any]:
        with self._lock:
            yield from volume_families([([], n, _volume_doc(v)) for n, v in self.volumes.items()])
            yield from server_families([([], self._server_doc())])

    def _server_doc(self) -> dict[str, Any]:
        """The per-server part of the heartbeat's health (the lock is held)."""
        merged = LatencyHistogram()
        for hist in self.latency.values():
            merged.counts = [a + b for a, b in zip(merged.counts, hist.counts, strict=True)]
            merged.sum_seconds += hist.sum_seconds
        return {
            "latency_ms": {
                "p50": merged.quantile(0.5) * 1000,
                "p99": merged.quantile(0.99) * 1000,
                "p999": merged.quantile(0.999) * 1000,
            },
            "latency_histogram": {
                "bounds_seconds": list(LATENCY_BOUNDS_S),
                "counts": merged.counts,
                "sum_seconds": merged.sum_seconds,
            },
            "io_errors": sum(self.io_errors.values()),
            "checksum_discrepancies": sum(v.checksum_discrepancies for v in self.volumes.values()),
            "failure": {
                "probability": self.failure_probability,
                "reasons": self.failure_reasons,
            },
        }

    def health(self) -> dict[str, Any]:
        """The health fields of a heartbeat (the Heartbeat schema of the manager's API)."""
        with self._lock:
            return {
                **self._server_doc(),
                "volumes": {name: _volume_doc(v) for name, v in self.volumes.items()},
            }


def _volume_doc(v: VolumeStats) -> dict[str, Any]:
    return {
        "written_bytes": v.written_bytes,
        "dirty_bytes": v.dirty_bytes,
        "epoch": v.epoch,
        "checksum_discrepancies": v.checksum_discrepancies,
        "shadows": {
            name: {"state": s.state, "lag_seconds": s.lag_seconds, "lag_bytes": s.lag_bytes}
            for name, s in v.shadows.items()
        },
    }


VolumeRow = tuple[list[str], str, dict[str, Any]]


def volume_families(rows: Iterable[VolumeRow], extra: Sequence[str] = ()) -> Iterator[Any]:
    """The per-volume families from ROWS of (values of the EXTRA labels, volume name,
    heartbeat-shaped volume document); the manager adds the label `server`."""
    extra = list(extra)
    written = CounterMetricFamily(
        "shadowblk_volume_written_bytes",
        "Bytes written to the primary volume.",
        labels=[*extra, "volume"],
    )
    dirty = GaugeMetricFamily(
        "shadowblk_volume_dirty_bytes",
        "Bytes marked dirty and not yet applied by every shadow.",
        labels=[*extra, "volume"],
    )
    epoch = GaugeMetricFamily(
        "shadowblk_volume_epoch", "The epoch the primary is writing.", labels=[*extra, "volume"]
    )
    lag_s = GaugeMetricFamily(
        "shadowblk_replication_lag_seconds",
        "Age of the oldest write a shadow has not applied.",
        labels=[*extra, "volume", "shadow"],
    )
    lag_b = GaugeMetricFamily(
        "shadowblk_replication_lag_bytes",
        "Bytes written to the primary that a shadow has not applied.",
        labels=[*extra, "volume", "shadow"],
    )
    state = GaugeMetricFamily(
        "shadowblk_shadow_state",
        "1 for the state each shadow is in, 0 for the others.",
        labels=[*extra, "volume", "shadow", "state"],
    )
    for values, volume, doc in rows:
        head = [*values, volume]
        written.add_metric(head, doc.get("written_bytes", 0))
        dirty.add_metric(head, doc.get("dirty_bytes", 0))
        epoch.add_metric(head, doc.get("epoch", 0))
        for shadow, s in doc.get("shadows", {}).items():
            lag_s.add_metric([*head, shadow], s.get("lag_seconds", 0))
            lag_b.add_metric([*head, shadow], s.get("lag_bytes", 0))
            for name in SHADOW_STATES:
                state.add_metric([*head, shadow, name], 1.0 if s.get("state") == name else 0.0)
    yield from (written, dirty, epoch, lag_s, lag_b, state)


def server_families(
    rows: Iterable[tuple[list[str], dict[str, Any]]], extra: Sequence[str] = ()
) -> Iterator[Any]:
    """The per-server families from ROWS of (values of the EXTRA labels, heartbeat-shaped
    server document); the manager adds the label `server`."""
    labels = list(extra)
    hist = HistogramMetricFamily(
        "shadowblk_io_latency_seconds", "Latency of the server's volume I/O.", labels=labels
    )
    errors = CounterMetricFamily(
        "shadowblk_io_errors", "I/O errors of the server's volumes.", labels=labels
    )
    disc = CounterMetricFamily(
        "shadowblk_checksum_discrepancies",
        "Blocks whose checksum differed between a primary and a shadow.",
        labels=labels,
    )
    fp = GaugeMetricFamily(
        "shadowblk_server_failure_probability",
        "The predictor's probability that the server fails soon.",
        labels=labels,
    )
    for head, doc in rows:
        h = doc.get("latency_histogram")
        if h:
            running, buckets = 0, []
            bounds = [*h["bounds_seconds"], float("inf")]
            for bound, count in zip(bounds, h["counts"], strict=False):
                running += count
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
            hist.add_metric(head, buckets, h.get("sum_seconds", 0.0))
        errors.add_metric(head, doc.get("io_errors", 0))
        disc.add_metric(head, doc.get("checksum_discrepancies", 0))
        fp.add_metric(head, (doc.get("failure") or {}).get("probability", 0.0))
    yield from (hist, errors, disc, fp)


def registry(metrics: AgentMetrics) -> CollectorRegistry:
    """A registry holding only METRICS (no process collectors: the manager test parses it)."""
    reg = CollectorRegistry()
    reg.register(metrics)
    return reg


def exposition(metrics: AgentMetrics) -> bytes:
    """The Prometheus text format of METRICS, what the agent's `/metrics` answers."""
    return generate_latest(registry(metrics))
