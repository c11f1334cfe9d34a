"""The manager's /metrics, built from a FleetView: the agents' families with a `server` label,
plus server up, generations, switchovers with their pauses, alerts firing."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from shadowblk.agent.metrics import AgentMetrics
from shadowblk.manager.alerts.engine import AlertEngine
from shadowblk.manager.dashboard.view import FleetView, SwitchoverTally
from shadowblk.manager.metrics import fleet_families
from shadowblk.manager.store.model import Event, Server, ServerState, Shadow, Volume


def fleet_view() -> FleetView:
    agent = AgentMetrics()
    agent.record_write("v1", 1 << 20)
    agent.set_volume("v1", dirty_bytes=4096, epoch=3)
    agent.set_shadow("v1", "s2", "in_sync", 0.5, 4096)
    agent.observe_io("write", 0.001)
    now = time.time()
    s1 = Server("s1", "a", "r", health=agent.health(), last_heartbeat=now, failure_probability=0.9)
    s2 = Server("s2", "b", "r", state=ServerState.DOWN, last_heartbeat=now - 60)
    tally = SwitchoverTally()
    results = [
        {"outcome": "succeeded", "pause_seconds": 0.003},
        {"outcome": "failed", "pause_seconds": 2.0},
    ]
    for detail in results:
        tally.add(detail)
    events = [Event("switchover-result", "v1", d, seq=i) for i, d in enumerate(results, 1)]
    volume = Volume("v1", 1 << 30, "s1", shadows=[Shadow("s2", "in_sync")], generation=4)
    return FleetView(now, [s1, s2], [volume], events, tally)


class Fixed(Collector):
    def __init__(self, view: FleetView) -> None:
        self.view = view
        self.engine = AlertEngine()
        self.engine.evaluate(view)

    def collect(self):
        webhooks = {"delivered": 3, "failed": 1}
        yield from fleet_families(self.view, self.engine.active(), True, webhooks)


def parsed() -> dict:
    registry = CollectorRegistry()
    registry.register(Fixed(fleet_view()))
    text = generate_latest(registry).decode()
    return {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)}  # fmt: skip


def test_fleet_families() -> None:
    f = parsed()
    key = (("server", "s1"), ("volume", "v1"))
    assert f["shadowblk_volume_written_bytes"][("shadowblk_volume_written_bytes_total", key)] == (
        1 << 20
    )
    assert f["shadowblk_volume_epoch"][("shadowblk_volume_epoch", key)] == 3
    lag = ("shadowblk_replication_lag_seconds", (("server", "s1"), ("shadow", "s2"),
                                                 ("volume", "v1")))  # fmt: skip
    assert f["shadowblk_replication_lag_seconds"][lag] == 0.5
    up = f["shadowblk_server_up"]
    assert up[("shadowblk_server_up", (("server", "s1"),))] == 1
    assert up[("shadowblk_server_up", (("server", "s2"),))] == 0
    assert (
        f["shadowblk_server_failure_probability"][
            ("shadowblk_server_failure_probability", (("server", "s1"),))
        ]
        == 0.9
    )
    assert (
        f["shadowblk_volume_generation"][("shadowblk_volume_generation", (("volume", "v1"),))] == 4
    )
    sw = f["shadowblk_switchovers"]
    assert sw[("shadowblk_switchovers_total", (("outcome", "failed"),))] == 1
    assert sw[("shadowblk_switchovers_total", (("outcome", "succeeded"),))] == 1
    pause = f["shadowblk_switchover_pause_seconds"]
    assert pause[("shadowblk_switchover_pause_seconds_bucket", (("le", "0.005"),))] == 1
    assert pause[("shadowblk_switchover_pause_seconds_bucket", (("le", "+Inf"),))] == 2
    assert pause[("shadowblk_switchover_pause_seconds_sum", ())] == 2.003
    firing = f["shadowblk_alerts_firing"]
    assert firing[("shadowblk_alerts_firing", (("alertname", "ServerDown"),
                                               ("severity", "critical")))] == 1  # fmt: skip
    assert firing[("shadowblk_alerts_firing", (("alertname", "FailureProbabilityHigh"),
                                               ("severity", "warning")))] == 1  # fmt: skip
    deliveries = f["shadowblk_alert_webhook_deliveries"]
    assert deliveries[("shadowblk_alert_webhook_deliveries_total", (("result", "failed"),))] == 1
    assert f["shadowblk_manager_leading"][("shadowblk_manager_leading", ())] == 1
    hist = f["shadowblk_io_latency_seconds"]
    assert hist[("shadowblk_io_latency_seconds_count", (("server", "s1"),))] == 1
