"""Where an agent's SMART report comes from: a recorded drive replayed day by day (its history
sent with each reading), or smartctl, read once at start and then in the background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shadowblk.agent.smart_source import SMART_EVERY_S, LiveSmart, ReplaySmart
from shadowblk.predict.readings import observations

HEADER = "date,serial_number,model,capacity_bytes,failure,smart_5_raw,smart_9_raw"


def daily(path: Path, days: int = 10) -> Path:
    """A drive whose reallocated sectors grow from day 6 and that fails on its last day."""
    lines = [HEADER]
    for d in range(days):
        date = np.datetime64("2016-03-01") + d
        fail = int(d == days - 1)
        lines.append(
            f"{date},Z1,ST4000DM000,4000787030016,{fail},{max(0, d - 5) * 8},{100 + 24 * d}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_replay_moves_one_day_per_1_over_speed_seconds(tmp_path: Path) -> None:
    source = ReplaySmart(daily(tmp_path / "z.csv"), None, days_per_second=2.0)
    first = source.poll(100.0)
    assert first["replay"] | {"file": "-"} == {
        "file": "-", "day": 0, "days": 10, "date": "2016-03-01", "last_date": "2016-03-10",
        "ends_in_failure": True, "speed_days_per_second": 2.0,
    }  # fmt: skip
    later = source.poll(103.6)  # 7.2 recorded days on
    device = later["devices"]["replay"]
    assert later["replay"]["date"] == device["date"] == "2016-03-08"
    assert device["attributes"] == {"5": 16} and device["power_on_hours"] == 268
    assert [h[0] for h in device["history"]] == [16861, 16867]  # first day, first change
    assert [o.values[5] for o in observations(device, today=0)] == [0, 8, 16]
    assert source.poll(1000.0)["replay"]["date"] == "2016-03-10"  # the last day stays


def test_a_replay_can_start_later_with_its_past_as_history(tmp_path: Path) -> None:
    source = ReplaySmart(daily(tmp_path / "z.csv"), "Z1", 1.0, start="2016-03-08")
    device = source.poll(0.0)["devices"]["replay"]
    assert device["date"] == "2016-03-08" and device["attributes"] == {"5": 16}
    assert [h[2] for h in device["history"]] == [{"5": 0}, {"5": 8}]  # the changes before
    with pytest.raises(ValueError, match="ends before 2017-01-01"):
        ReplaySmart(tmp_path / "z.csv", None, 1.0, start="2017-01-01")


def test_live_smart_reads_at_once_then_every_interval(tmp_path: Path) -> None:
    source = LiveSmart(tmp_path)
    report = source.poll(0.0)
    assert report["status"] == "no SMART device"  # tmp is no physical disk here
    assert source.poll(SMART_EVERY_S / 2) is report
