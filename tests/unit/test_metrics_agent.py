"""The agent's metrics library: its /metrics parses with Prometheus's text parser and carries
the families of docs/monitoring.md; its heartbeat health is what the manager's API accepts."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shadowblk.agent.metrics import LATENCY_BOUNDS_S, AgentMetrics, exposition
from shadowblk.manager.api_errors import ApiError
from shadowblk.manager.api_schema import check


def busy_agent() -> AgentMetrics:
    m = AgentMetrics()
    m.record_write("v1", 4096)
    m.record_write("v1", 8192)
    m.set_volume("v1", dirty_bytes=12288, epoch=9)
    m.set_shadow("v1", "s2", "in_sync", 0.25, 4096)
    m.set_shadow("v1", "s3", "stale", 40.0, 1 << 20)
    for seconds in (0.0001, 0.0004, 0.003, 0.003, 20.0):
        m.observe_io("write", seconds)
    m.observe_io("read", 0.002, error=True)
    m.add_discrepancies("v1", 3)
    m.set_failure(0.35, ["SMART 197 pending sectors: 8"])
    return m


def families(m: AgentMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(exposition(m).decode())}


def sample(family, suffix: str = "", **labels: str) -> float:
    matches = [
        s.value for s in family.samples if s.name == family.name + suffix and s.labels == labels
    ]
    assert len(matches) == 1, (labels, family.samples)
    return matches[0]


def test_exposition_carries_every_family() -> None:
    f = families(busy_agent())
    assert sample(f["shadowblk_volume_written_bytes"], "_total", volume="v1") == 12288
    assert f["shadowblk_volume_written_bytes"].type == "counter"
    assert sample(f["shadowblk_volume_dirty_bytes"], volume="v1") == 12288
    assert sample(f["shadowblk_volume_epoch"], volume="v1") == 9
    assert sample(f["shadowblk_replication_lag_seconds"], volume="v1", shadow="s3") == 40.0
    assert sample(f["shadowblk_replication_lag_bytes"], volume="v1", shadow="s2") == 4096
    state = f["shadowblk_shadow_state"]
    assert sample(state, volume="v1", shadow="s3", state="stale") == 1
    assert sample(state, volume="v1", shadow="s3", state="in_sync") == 0
    hist = f["shadowblk_io_latency_seconds"]
    assert hist.type == "histogram"
    assert sample(hist, "_bucket", le="0.0005") == 2
    assert sample(hist, "_bucket", le="0.005") == 5
    assert sample(hist, "_bucket", le="10.0") == 5
    assert sample(hist, "_bucket", le="+Inf") == 6  # the 20 s request is past the last bound
    assert sample(hist, "_count") == 6
    assert sample(hist, "_sum") == pytest.approx(20.0085)
    assert sample(f["shadowblk_io_errors"], "_total") == 1
    assert sample(f["shadowblk_checksum_discrepancies"], "_total") == 3
    assert sample(f["shadowblk_server_failure_probability"]) == 0.35


def test_a_quiet_agent_exports_zeroes_not_nothing() -> None:
    f = families(AgentMetrics())
    assert sample(f["shadowblk_io_errors"], "_total") == 0
    assert f["shadowblk_volume_dirty_bytes"].samples == []


def test_health_is_a_valid_heartbeat() -> None:
    health = busy_agent().health()
    check("Heartbeat", {"used_bytes": 0, **health})
    assert health["volumes"]["v1"]["shadows"]["s3"] == {
        "state": "stale", "lag_seconds": 40.0, "lag_bytes": 1 << 20,
    }  # fmt: skip
    assert health["latency_ms"]["p50"] == 2.5  # the bound of the bucket of the 3rd of 6 (2 ms)
    assert health["latency_ms"]["p99"] == 10.0 * 1000  # past the last bound: the last bound
    assert health["latency_histogram"]["bounds_seconds"] == list(LATENCY_BOUNDS_S)
    assert sum(health["latency_histogram"]["counts"]) == 6
    assert health["failure"] == {"probability": 0.35, "reasons": ["SMART 197 pending sectors: 8"]}


def test_the_heartbeat_schema_refuses_bad_health() -> None:
    health = busy_agent().health()
    health["volumes"]["v1"]["shadows"]["s2"]["state"] = "sleeping"
    with pytest.raises(ApiError, match=r"body\.volumes\.v1\.shadows\.s2\.state"):
        check("Heartbeat", {"used_bytes": 0, **health})
    with pytest.raises(ApiError, match=r"body\.failure\.probability"):
        check("Heartbeat", {"used_bytes": 0, "failure": {"probability": 1.5}})


def test_unknown_shadow_state_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of"):
        AgentMetrics().set_shadow("v1", "s2", "asleep", 0, 0)
