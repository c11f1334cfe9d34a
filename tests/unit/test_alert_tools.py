"""The Prometheus alerting rules and the Grafana dashboard under tools/: the rules pass
`promtool check rules` and their own `promtool test rules`; every expression of the dashboard
is valid PromQL (promtool checks it as a recording rule) and names only families the manager
exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.unit.test_metrics_fleet import parsed

TOOLS = Path(__file__).resolve().parents[2] / "tools"
RULES = TOOLS / "prometheus" / "shadowblk-alerts.yml"
PROMTOOL = "/usr/bin/promtool"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def exported() -> set[str]:
    """Every sample name the manager's /metrics can carry."""
    return {name for family in parsed().values() for name, _ in family}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(shadowblk_[a-z0-9_]+)", expr))


def test_rules_check_and_unit_tests_pass() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout
    tested = promtool("test", "rules", str(RULES.with_suffix(".test.yml")))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_catches_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        RULES.read_text().replace("shadowblk_server_up == 0", "shadowblk_server_up ==")
    )
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_rules_name_only_exported_families() -> None:
    known = exported()
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"ServerDown", "ShadowOutOfSync", "ReplicationLagHigh",
                                           "ChecksumDiscrepancy", "FailureProbabilityHigh",
                                           "SwitchoverFailed"}  # fmt: skip
    for rule in rules:
        assert metric_names(rule["expr"]) <= known, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")


def test_grafana_dashboard(tmp_path: Path) -> None:
    dashboard = json.loads((TOOLS / "grafana" / "shadowblk-fleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10 and dashboard["uid"]
    known = exported()
    for expr in exprs:
        assert metric_names(expr) and metric_names(expr) <= known, expr
    as_rules = {"groups": [{"name": "grafana", "rules": [
        {"record": f"grafana:panel{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}  # fmt: skip
    path = tmp_path / "grafana-exprs.yml"
    path.write_text(yaml.safe_dump(as_rules))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
