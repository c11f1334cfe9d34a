"""The manager's failure predictor on a real SQLite store, fed heartbeats as agents send them:
latency spikes against the server's own baseline, counters over a window, the trigger's
decision recorded (dry run) or a drain asked for, and SMART left unscored without a model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from shadowblk.manager.risk import Increase, RiskMonitor, RiskSettings
from shadowblk.manager.store import Store, open_store
from shadowblk.manager.store.model import Volume
from shadowblk.predict.trigger import TriggerSettings


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:{tmp_path / 'store.db'}")


def beat(ms: float, iops: float = 400.0, errors: int = 0, checksums: int = 0) -> dict:
    window = {"seconds": 1.0, "probes": 5, "errors": 0, "iops": iops, "min_ms": ms}
    counters = {"io_errors": errors, "checksum_discrepancies": checksums}
    return {"used_bytes": 0, "io_window": window, **counters, "smart": {"status": "none"}}


def test_a_slow_store_is_flagged_and_a_load_change_is_not(store: Store) -> None:
    monitor = RiskMonitor(store, None)
    rng = random.Random(4)
    now = 0.0
    for load in [400.0] * 40 + [50.0] * 20 + [900.0] * 20:  # healthy, the load changing
        now += 1
        doc = monitor.assess("s1", beat(0.15 * rng.uniform(0.8, 1.25), load), now)
        assert not doc["signals"]["latency"]["flagged"], doc["signals"]["latency"]
    assert doc["signals"]["latency"]["spike_share"] == 0
    for _ in range(15):  # every read 20 ms, at the lower load a slow store leaves
        now += 1
        doc = monitor.assess("s1", beat(20.0, 60.0), now)
    latency = doc["signals"]["latency"]
    assert latency["flagged"] and latency["z"] > 6
    assert doc["reasons"][0].startswith("latency: spike share")
    assert doc["confidence"] == pytest.approx(0.45) and doc["level"] == "low"  # no SMART


def test_counters_count_over_the_window_and_restart_after_a_drop() -> None:
    grew = Increase(window_s=10)
    assert [grew.update(t, v) for t, v in [(0, 5), (5, 7), (9, 9)]] == [0, 2, 4]
    assert grew.update(16, 9) == 2  # the growth before t=6 has left the window
    assert grew.update(17, 1) == 0  # a restarted agent counts from 0 again


def test_the_trigger_records_its_decision_in_dry_run(store: Store) -> None:
    trigger = TriggerSettings(threshold=0.5, sustain_seconds=3, min_confidence=0.2, dry_run=True)
    monitor = RiskMonitor(store, None, RiskSettings(trigger))
    store.create_volume(Volume("v1", 1 << 20, "s1"))
    monitor.assess("s1", beat(0.2, errors=0, checksums=0), 0.0)
    decisions = [
        monitor.assess("s1", beat(0.2, errors=20, checksums=5), float(t)) for t in range(1, 8)
    ]
    assert decisions[0]["probability"] > 0.5
    assert [d["trigger"]["state"] for d in decisions[:3]] == ["pending"] * 3
    assert decisions[-1]["trigger"]["state"] == "fired"
    (event,) = [e for e in store.events() if e.kind == "failure-preempt"]
    assert event.subject == "s1" and event.detail["dry_run"] and event.detail["primaries"] == ["v1"]
    assert "checksums: mismatches 5" in event.detail["reason"]


def test_the_trigger_asks_for_a_drain_once(store: Store) -> None:
    trigger = TriggerSettings(threshold=0.5, sustain_seconds=0, min_confidence=0.2)
    asked: list[tuple[str, str]] = []
    monitor = RiskMonitor(store, None, RiskSettings(trigger), lambda s, r: asked.append((s, r)))
    monitor.assess("s1", beat(0.2), 0.0)
    for t in range(1, 4):
        monitor.assess("s1", beat(0.2, errors=20, checksums=5), float(t))
    assert len(asked) == 1 and asked[0][0] == "s1" and "predicted failure of s1" in asked[0][1]
    (event,) = [e for e in store.events() if e.kind == "failure-preempt"]
    assert event.detail["drain"] == "started" and not event.detail["dry_run"]


def test_without_a_model_smart_is_shown_unscored(store: Store) -> None:
    monitor = RiskMonitor(store, None)
    body = beat(0.2) | {"smart": {"status": "ok", "devices": {"sda": {"attributes": {}}}}}
    doc = monitor.assess("s1", body, 0.0)
    assert "no model" in doc["signals"]["smart"]["disks"]["sda"]["error"]
    assert doc["reasons"][0] == "smart: missing: fleet prior 0.005 used"


def test_an_agents_own_higher_score_is_kept_with_its_reasons(store: Store) -> None:
    body = beat(0.2) | {"failure": {"probability": 0.85, "reasons": ["SMART 5 grew by 40"]}}
    doc = RiskMonitor(store, None).assess("s1", body, 0.0)
    assert doc["probability"] == 0.85 and doc["reasons"][0] == "agent: SMART 5 grew by 40"


def test_an_agents_own_estimate_is_used_only_when_it_is_a_probability() -> None:
    from shadowblk.manager.risk import _reported

    assert _reported({"probability": 0.7, "reasons": ["smart_5", 3]}) == (0.7, ["smart_5"])
    for bad in (float("nan"), float("inf"), 1.5, -0.1, "0.9", True, None):
        assert _reported({"probability": bad, "reasons": []}) is None
    assert _reported({"probability": 0.5, "reasons": "x"}) is None
    assert _reported("garbage") is None
