"""Each alert rule fires on the fleet it is about, stays quiet otherwise, and says why."""

from __future__ import annotations

from shadowblk.manager.alerts.rules import (
    ChecksumDiscrepancies,
    Thresholds,
    failure_probability,
    replication_lag,
    server_down,
    shadow_out_of_sync,
    switchover_failed,
)
from shadowblk.manager.dashboard.view import FleetView, SwitchoverTally
from shadowblk.manager.store.model import Event, Server, ServerState, Shadow, Volume

TH = Thresholds(lag_seconds=30, lag_bytes=1000, failure_probability=0.5, discrepancy_window_s=60)
NOW = 1_000_000.0


def view(
    *,
    shadow_report: dict | None = None,
    s2_state: ServerState = ServerState.UP,
    store_shadow: str = "in_sync",
    fp: float = 0.1,
    discrepancies: int = 0,
    results: tuple[str, ...] = (),
    at: float = NOW,
) -> FleetView:
    report = {"state": "in_sync", "lag_seconds": 1.0, "lag_bytes": 10, **(shadow_report or {})}
    s1 = Server(
        "s1", "a", "r", last_heartbeat=at, failure_probability=fp,
        health={
            "volumes": {"v1": {"shadows": {"s2": report}}},
            "checksum_discrepancies": discrepancies,
            "failure": {"probability": fp, "reasons": ["SMART 5 grew by 40"]},
        },
    )  # fmt: skip
    s2 = Server("s2", "b", "r", state=s2_state, last_heartbeat=at - 20)
    volume = Volume("v1", 1 << 30, "s1", shadows=[Shadow("s2", store_shadow)])
    events = [
        Event("switchover-result", "v1", {"from": "s1", "to": "s2", "outcome": o,
                                           "reason": "fence timeout"}, seq=i)
        for i, o in enumerate(results, 1)
    ]  # fmt: skip
    return FleetView(at, [s1, s2], [volume], events, SwitchoverTally())


def labels(alerts) -> list[tuple[str, dict]]:
    return [(a.name, dict(a.labels)) for a in alerts]


def test_server_down() -> None:
    assert server_down(view(), TH) == []
    [alert] = server_down(view(s2_state=ServerState.DOWN), TH)
    assert (alert.name, dict(alert.labels), alert.severity) == (
        "ServerDown", {"server": "s2"}, "critical",
    )  # fmt: skip
    assert alert.summary == "server s2 is down: no heartbeat for 20 s"
    assert alert.resolved == "server s2 is up again"
    assert server_down(view(s2_state=ServerState.DRAINING), TH) == []


def test_shadow_out_of_sync_for_each_reason() -> None:
    assert shadow_out_of_sync(view(), TH) == []
    assert shadow_out_of_sync(view(shadow_report={"state": "syncing"}), TH) == []
    cases = {
        "its server s2 is down": view(s2_state=ServerState.DOWN),
        "the manager marks it stale": view(store_shadow="stale"),
        "the primary s1 reports it disconnected": view(shadow_report={"state": "disconnected"}),
        "the primary s1 reports it stale": view(shadow_report={"state": "stale"}),
    }
    for why, fleet in cases.items():
        [alert] = shadow_out_of_sync(fleet, TH)
        assert labels([alert]) == [("ShadowOutOfSync", {"volume": "v1", "shadow": "s2"})]
        assert alert.summary.endswith(why), alert.summary


def test_replication_lag_in_seconds_or_bytes() -> None:
    assert replication_lag(view(shadow_report={"lag_seconds": 30}), TH) == []
    [by_time] = replication_lag(view(shadow_report={"lag_seconds": 30.5}), TH)
    [by_bytes] = replication_lag(view(shadow_report={"lag_bytes": 1001}), TH)
    assert by_time.key == by_bytes.key  # one problem, one alert, whichever limit it crossed
    assert "lags 30.5 s / 10 bytes" in by_time.summary


def test_failure_probability_carries_the_reasons() -> None:
    assert failure_probability(view(fp=0.5), TH) == []
    [alert] = failure_probability(view(fp=0.8), TH)
    assert labels([alert]) == [("FailureProbabilityHigh", {"server": "s1"})]
    assert alert.description == "SMART 5 grew by 40"


def test_switchover_failed_until_one_succeeds() -> None:
    assert switchover_failed(view(results=("succeeded",)), TH) == []
    [alert] = switchover_failed(view(results=("succeeded", "failed")), TH)
    assert alert.severity == "critical" and alert.description == "fence timeout"
    assert switchover_failed(view(results=("failed", "succeeded")), TH) == []


def test_checksum_discrepancy_fires_on_growth_for_a_window() -> None:
    rule = ChecksumDiscrepancies()
    assert rule(view(discrepancies=5), TH) == []  # the first count seen is the baseline
    assert rule(view(discrepancies=5, at=NOW + 1), TH) == []
    [alert] = rule(view(discrepancies=8, at=NOW + 2), TH)
    assert labels([alert]) == [("ChecksumDiscrepancy", {"server": "s1"})]
    assert "3 block(s)" in alert.summary
    assert rule(view(discrepancies=8, at=NOW + 61), TH) != []
    assert rule(view(discrepancies=8, at=NOW + 63), TH) == []
