"""The manager's `/metrics`: the whole fleet as the agents' heartbeats and the event log tell it,
in the Prometheus text format, with the same family names an agent exports plus a `server`
label, and the manager's own families (server up, generations, switchovers, alerts).

Built from the observer's latest FleetView at each scrape, so a scrape never touches the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from shadowblk.agent.metrics import server_families, volume_families
from shadowblk.manager.alerts.engine import Notification
from shadowblk.manager.dashboard.observer import Observer
from shadowblk.manager.dashboard.view import PAUSE_BOUNDS_S, FleetView
from shadowblk.manager.store.model import ServerState


def fleet_families(
    view: FleetView, alerts: list[Notification], leading: bool, webhooks: dict[str, int]
) -> Iterator[Any]:
    """Every family of the manager's /metrics for VIEW."""
    rows = [([v.primary], v.name, view.volume_health(v)) for v in view.volumes]
    yield from volume_families(rows, ["server"])
    # the stored score, which the predictor may set without a heartbeat, wins over the report
    docs = [([s.name], {**s.health, "failure": {"probability": s.failure_probability}})
            for s in view.servers]  # fmt: skip
    yield from server_families(docs, ["server"])
    confidence = GaugeMetricFamily(
        "shadowblk_server_failure_confidence",
        "How much of the predictor's evidence was there and fresh, 0..1 (docs/prediction.md).",
        labels=["server"],
    )
    for s in view.servers:
        c = (s.health.get("failure") or {}).get("confidence")
        if isinstance(c, int | float):
            confidence.add_metric([s.name], c)
    up = GaugeMetricFamily(
        "shadowblk_server_up", "1 while the server heartbeats.", labels=["server"]
    )
    for s in view.servers:
        up.add_metric([s.name], 0.0 if s.state is ServerState.DOWN else 1.0)
    generation = GaugeMetricFamily(
        "shadowblk_volume_generation", "The volume's generation (raised by switchover).",
        labels=["volume"],
    )  # fmt: skip
    for v in view.volumes:
        generation.add_metric([v.name], v.generation)
    switchovers = CounterMetricFamily(
        "shadowblk_switchovers", "Switchovers reported since the manager started, by outcome.",
        labels=["outcome"],
    )  # fmt: skip
    for outcome in ("succeeded", "failed"):
        switchovers.add_metric([outcome], view.tally.outcomes[outcome])
    pause = HistogramMetricFamily(
        "shadowblk_switchover_pause_seconds", "How long switchovers paused the VM's I/O."
    )
    running, buckets = 0, []
    for bound, count in zip([*PAUSE_BOUNDS_S, None], view.tally.pause_counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound is None else repr(bound), running))
    pause.add_metric([], buckets, view.tally.pause_sum_seconds)
    firing = GaugeMetricFamily(
        "shadowblk_alerts_firing", "Alerts firing now, by name and severity.",
        labels=["alertname", "severity"],
    )  # fmt: skip
    counts: dict[tuple[str, str], int] = {}
    for n in alerts:
        key = (n.alert.name, n.alert.severity)
        counts[key] = counts.get(key, 0) + 1
    for key, count in sorted(counts.items()):
        firing.add_metric(list(key), count)
    deliveries = CounterMetricFamily(
        "shadowblk_alert_webhook_deliveries", "Webhook messages by result.", labels=["result"]
    )
    for result, count in webhooks.items():
        deliveries.add_metric([result], count)
    lead = GaugeMetricFamily("shadowblk_manager_leading", "1 if this manager leads.")
    lead.add_metric([], 1.0 if leading else 0.0)
    yield from (confidence, up, generation, switchovers, pause, firing, deliveries, lead)


class FleetCollector(Collector):
    """The observer's latest view as Prometheus families (nothing before the first round)."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def collect(self) -> Iterator[Any]:
        o = self.observer
        if o.view is not None:
            webhooks = {"delivered": o.webhooks.delivered, "failed": o.webhooks.failed}
            yield from fleet_families(o.view, o.engine.active(), o.manager.leading, webhooks)


def handler(observer: Observer) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler of GET /metrics."""
    registry = CollectorRegistry()
    registry.register(FleetCollector(observer))

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics
