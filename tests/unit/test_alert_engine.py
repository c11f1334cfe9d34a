"""The engine deduplicates and resolves; notifications are in Alertmanager's webhook format;
the alerts configuration refuses what it cannot use."""

from __future__ import annotations

import pytest

from shadowblk.manager.alerts.alertmanager import payload
from shadowblk.manager.alerts.config import AlertsConfig, ConfigError, parse
from shadowblk.manager.alerts.engine import AlertEngine
from shadowblk.manager.alerts.rules import Thresholds
from shadowblk.manager.store.model import ServerState
from tests.unit.test_alert_rules import NOW, view


def test_fire_once_then_resolve_once() -> None:
    engine = AlertEngine()
    assert engine.evaluate(view()) == []
    fired = engine.evaluate(view(s2_state=ServerState.DOWN, at=NOW + 1))
    down = {"ServerDown", "ShadowOutOfSync"}
    assert {n.alert.name for n in fired} == down and {n.status for n in fired} == {"firing"}
    assert {n.alert.name for n in engine.active()} == down
    assert engine.evaluate(view(s2_state=ServerState.DOWN, at=NOW + 2)) == []  # no repeat
    resolved = engine.evaluate(view(at=NOW + 3))
    assert {n.alert.name for n in resolved} == down
    assert all(n.status == "resolved" and n.ends_at == NOW + 3 for n in resolved)
    assert all(n.starts_at == NOW + 1 for n in resolved)
    assert engine.active() == []


def test_active_puts_critical_first() -> None:
    engine = AlertEngine()
    engine.evaluate(view(fp=0.9))
    engine.evaluate(view(fp=0.9, s2_state=ServerState.DOWN, at=NOW + 1))
    assert [n.alert.name for n in engine.active()] == [
        "ServerDown", "FailureProbabilityHigh", "ShadowOutOfSync",
    ]  # fmt: skip


def test_alertmanager_payload() -> None:
    engine = AlertEngine()
    engine.evaluate(view())
    [down, out] = engine.evaluate(view(s2_state=ServerState.DOWN, at=NOW + 1))
    firing = payload(down, "http://mgr:7600")
    assert firing["version"] == "4" and firing["status"] == "firing"
    assert firing["commonLabels"] == {"alertname": "ServerDown", "severity": "critical",
                                      "server": "s2"}  # fmt: skip
    [alert] = firing["alerts"]
    assert alert["startsAt"] == "1970-01-12T13:46:41Z"
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert alert["annotations"]["summary"].startswith("server s2 is down")
    assert alert["generatorURL"] == "http://mgr:7600/dashboard/"
    [gone, _] = engine.evaluate(view(at=NOW + 2))
    resolved = payload(gone, "http://mgr:7600")
    assert resolved["status"] == "resolved"
    assert resolved["alerts"][0]["endsAt"] == "1970-01-12T13:46:42Z"
    assert resolved["alerts"][0]["annotations"]["summary"] == "server s2 is up again"
    assert resolved["alerts"][0]["fingerprint"] == alert["fingerprint"]
    assert payload(out, "")["alerts"][0]["fingerprint"] != alert["fingerprint"]


def test_config() -> None:
    assert parse("") == AlertsConfig()
    config = parse("webhooks: [http://h/x]\nthresholds: {lag_seconds: 5}\nevaluate_every_s: 2\n")
    assert config.webhooks == ["http://h/x"] and config.evaluate_every_s == 2
    assert config.thresholds == Thresholds(lag_seconds=5)
    for text, message in [
        ("- a", "mapping"),
        ("hooks: []", "unknown key"),
        ("webhooks: [ftp://h]", "http"),
        ("thresholds: {lag: 1}", "thresholds take only"),
        ("thresholds: {lag_seconds: -1}", ">= 0"),
        ("thresholds: {lag_seconds: yes}", ">= 0"),
        ("evaluate_every_s: 0", "0.1 to 60"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse(text)
