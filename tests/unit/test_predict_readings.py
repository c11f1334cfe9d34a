"""A disk's SMART readings as the heartbeat carries them (history of changes plus today), the
start-stop extract replayed one day at a time, and the test-only slow store's delay file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shadowblk.nbd.slowdisk import Delay
from shadowblk.predict.drives import ATTRIBUTES
from shadowblk.predict.loaders import DataFormatError
from shadowblk.predict.readings import SmartLog, observations
from shadowblk.predict.replay import SmartObservation, replay

START_STOP = """serial_number,model,manufacturer,size_tb,min_date,min_hours,tstart,tstop,fails,smart_5,smart_197
Z1,ST4000DM000,ST,4,2015-01-01,1000,1000,1048,0,0,0
Z1,ST4000DM000,ST,4,2015-01-01,1000,1048,1100,0,8,2
Z1,ST4000DM000,ST,4,2015-01-01,1000,1100,1120,1,24,
Z2,ST4000DM000,ST,4,2015-01-01,500,500,600,0,0,0
"""  # noqa: E501


def reading(day: int, realloc: float | None, hours: float = 100.0) -> SmartObservation:
    values = {a: None for a in ATTRIBUTES} | {5: realloc}
    return SmartObservation("S", "M", day, hours + 24 * day, 4.0, values, False)


def test_the_log_keeps_changes_and_today() -> None:
    log = SmartLog()
    for day, value in [(1, 0), (2, 0), (3, 8), (3, 9), (4, 9), (5, 9)]:
        log.add(reading(day, value))
    doc = log.device()
    assert doc["day"] == 5 and doc["attributes"] == {"5": 9}
    assert [h[0] for h in doc["history"]] == [1, 3]  # day 3's second reading replaced its first
    back = observations(doc, today=99)
    assert [(o.day, o.values[5]) for o in back] == [(1, 0), (3, 9), (5, 9)]
    with pytest.raises(ValueError, match="day order"):
        log.add(reading(4, 9))


def test_a_live_reading_is_today_with_hours_from_attribute_9() -> None:
    (obs,) = observations({"serial": "X", "attributes": {"5": 1, "9": 5000}}, today=20000)
    assert obs.day == 20000 and obs.power_on_hours == 5000 and obs.values[5] == 1


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"attributes": {"5": "many"}}, "attribute 5 is 'many', not a number"),
        ({"attributes": {}, "history": [[1, 2]]}, r"history\[0\] is not \[day"),
        ({"attributes": {}, "day": 3, "history": [[5, None, {}]]}, "not in day order"),
        ({"attributes": [1]}, "attributes must be an object"),
    ],
)
def test_bad_reports_are_clear_errors(doc: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        observations(doc, today=10)


def test_a_start_stop_drive_replays_one_reading_a_day(tmp_path: Path) -> None:
    path = tmp_path / "ss.csv"
    path.write_text(START_STOP)
    days = list(replay(path, "Z1"))
    assert len(days) == 6  # 120 hours, counted back from the last record
    assert days[-1].failure and not any(o.failure for o in days[:-1])
    assert days[-1].power_on_hours == 1120 and days[-1].date == "2015-01-06"
    assert [o.values[5] for o in days] == [0, 0, 0, 8, 8, 24]  # in force at each hour
    assert days[-1].values[197] is None and days[-1].capacity_tb == 4
    with pytest.raises(DataFormatError, match="2 drives; name the one"):
        list(replay(path))


def test_the_delay_file_is_read_at_most_once_a_second(tmp_path: Path) -> None:
    path = tmp_path / "delay"
    delay = Delay(str(path))
    assert delay() == 0.0  # no file: no delay
    path.write_text("20\n")
    assert delay() == 0.0  # read less than a second ago
    time.sleep(1.05)
    assert delay() == pytest.approx(0.02)
    path.write_text("fast")
    time.sleep(1.05)
    assert delay() == 0.0
