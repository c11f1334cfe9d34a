"""The agent's health measures on this machine's real filesystem, and the summary of a
smartctl JSON document (the shape smartctl 7 prints for an ATA disk)."""

from __future__ import annotations

from pathlib import Path

from shadowblk.agent import health
from shadowblk.agent.metrics import AgentMetrics

SMARTCTL_ATA = {
    "model_name": "ST4000DM000-1F2168",
    "serial_number": "Z300XXXX",
    "smart_status": {"passed": True},
    "ata_smart_attributes": {
        "table": [
            {"id": 1, "name": "Raw_Read_Error_Rate", "raw": {"value": 123}},
            {"id": 5, "name": "Reallocated_Sector_Ct", "raw": {"value": 8}},
            {"id": 187, "name": "Reported_Uncorrect", "raw": {"value": 2}},
            {"id": 197, "name": "Current_Pending_Sector", "raw": {"value": 0}},
        ]
    },
}


def test_probe_feeds_the_heartbeat_latency(tmp_path: Path) -> None:
    metrics = AgentMetrics()
    probe = health.LatencyProbe(tmp_path, metrics)
    for _ in range(20):
        probe.probe()
    doc = metrics.health()
    p = doc["latency_ms"]
    assert 0 < p["p50"] <= p["p99"] <= p["p999"]
    assert sum(doc["latency_histogram"]["counts"]) == 20 and doc["io_errors"] == 0
    assert (tmp_path / ".latency-probe").stat().st_size == 4096


def test_probe_counts_errors(tmp_path: Path) -> None:
    metrics = AgentMetrics()
    health.LatencyProbe(tmp_path / "missing", metrics).probe()
    assert metrics.health()["io_errors"] == 1


def test_space_of_the_data_dir(tmp_path: Path) -> None:
    capacity, used = health.space(tmp_path)
    assert 0 < used < capacity


def test_smart_reports_a_device_or_says_why_not(tmp_path: Path) -> None:
    report = health.smart(tmp_path)
    if report["status"] == "ok":
        assert report["devices"]
    else:
        assert report["status"] == "no SMART device" and report["reason"]


def test_summary_keeps_the_predictive_attributes() -> None:
    summary = health.summarise(SMARTCTL_ATA)
    assert summary == {
        "model": "ST4000DM000-1F2168",
        "serial": "Z300XXXX",
        "passed": True,
        "attributes": {"5": 8, "187": 2, "197": 0},
    }
    assert health.drive_models({"status": "ok", "devices": {"sda": summary}}) == [
        "ST4000DM000-1F2168"
    ]
    assert health.drive_models({"status": "no SMART device", "reason": "tmpfs"}) == []
