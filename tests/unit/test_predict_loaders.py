"""Reading SMART history: both formats, missing attributes, and clear errors on bad input."""

from pathlib import Path

import numpy as np
import pytest

from shadowblk.predict.drives import ATTRIBUTES
from shadowblk.predict.loaders import DataFormatError, load_drives

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hds.csv.gz"
DAILY_HEADER = (
    "date,serial_number,model,capacity_bytes,failure,smart_5_raw,smart_9_raw,smart_197_raw"
)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def daily_rows(serial: str, days: int, fail_last: bool, bump_day: int | None = None) -> list[str]:
    rows = []
    for d in range(days):
        date = str(np.datetime64("2016-01-01") + d)
        smart5 = 8 if bump_day is not None and d >= bump_day else 0
        failure = int(fail_last and d == days - 1)
        rows.append(
            f"{date},{serial},ST4000DM000,4000787030016,{failure},{smart5},{1000 + 24 * d},"
        )
    return rows


def test_daily_csv_keeps_changes_and_failure(tmp_path: Path) -> None:
    path = write(
        tmp_path / "d.csv",
        [DAILY_HEADER, *daily_rows("A", 10, True, bump_day=6), *daily_rows("B", 5, False)],
    )
    table = load_drives([path])
    assert list(table.serial) == ["A", "B"]
    assert list(table.failed) == [True, False]
    assert list(table.start_hour) == [1000, 1000]
    assert list(table.end_hour) == [1000 + 24 * 9, 1000 + 24 * 4]
    # drive A: the first day, then the day smart_5 went 0 -> 8; drive B never changed
    assert list(np.diff(table.offsets)) == [2, 1]
    assert table.obs_hour[1] == 1000 + 24 * 6
    assert table.obs_values[1, ATTRIBUTES.index(5)] == 8
    # attributes the file does not carry are missing, not zero
    assert np.isnan(table.obs_values[:, ATTRIBUTES.index(187)]).all()
    assert table.start_day[0] == np.datetime64("2016-01-01").astype(int)
    assert table.maker[0] == "ST"
    assert table.capacity_tb[0] == pytest.approx(4.0, abs=0.01)


def test_daily_files_of_one_day_each_pool_into_one_drive(tmp_path: Path) -> None:
    rows = daily_rows("A", 4, True, bump_day=2)
    paths = [write(tmp_path / f"day{i}.csv", [DAILY_HEADER, row]) for i, row in enumerate(rows)]
    table = load_drives(reversed(paths))
    assert len(table) == 1 and table.failed[0]
    assert table.end_hour[0] - table.start_hour[0] == 72


def test_missing_power_on_hours_are_counted_from_dates(tmp_path: Path) -> None:
    header = "date,serial_number,model,failure,smart_5_raw"
    path = write(tmp_path / "d.csv", [header, "2016-01-01,A,WDC X,0,0", "2016-01-03,A,WDC X,1,2"])
    table = load_drives([path])
    assert table.end_hour[0] - table.start_hour[0] == 48
    assert table.maker[0] == "WDC"


def test_start_stop_csv(tmp_path: Path) -> None:
    header = "serial_number,model,min_date,min_hours,tstart,tstop,fails,smart_5,smart_197"
    path = write(
        tmp_path / "s.csv",
        [header, "Z,HGST H,2015-03-01,100,100,300,0,0,0", "Z,HGST H,2015-03-01,100,300,500,1,4,"],
    )
    table = load_drives([path])
    assert table.failed[0] and table.start_hour[0] == 100 and table.end_hour[0] == 500
    assert list(table.obs_hour) == [100, 300]
    assert np.isnan(table.obs_values[1, ATTRIBUTES.index(197)])
    assert table.day_at(np.array([0]), np.array([148.0]))[0] == np.datetime64("2015-03-03").astype(
        int
    )


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["date,serial_number,model,smart_5_raw", "2016-01-01,A,M,0"], "without column(s) failure"),
        ([DAILY_HEADER, "2016-01-01,A,M,1,0,abc,10,0"], "line 2: column 'smart_5_raw' is 'abc'"),
        ([DAILY_HEADER, "2016-13-45,A,M,1,0,0,10,0"], "column 'date' is '2016-13-45'"),
        (["date,serial_number,model,failure", "2016-01-01,A,M,0"], "no SMART attribute column"),
        (["foo,bar", "1,2"], "not SMART history"),
        (["serial_number,model,tstart,tstop", "A,M,1,2"], "without column(s) min_date"),
        ([DAILY_HEADER, "2016-01-01,A,M,1,,0,10,0"], "column 'failure' is empty"),
    ],
)
def test_bad_csv_is_a_clear_error(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(DataFormatError, match=None) as err:
        load_drives([write(tmp_path / "bad.csv", lines)])
    assert message in str(err.value)
    assert "bad.csv" in str(err.value)


def test_ragged_and_empty_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="cannot read as CSV"):
        load_drives([write(tmp_path / "r.csv", [DAILY_HEADER, "2016-01-01,A,M,1,0,0,10,0,9,9"])])
    with pytest.raises(DataFormatError, match="empty file"):
        load_drives([write(tmp_path / "e.csv", [""])])


@pytest.mark.skipif(not DATA.exists(), reason="shared data not beside the repository")
def test_shared_extract_matches_its_readme() -> None:
    table = load_drives([DATA])
    assert len(table) == 87_068
    assert table.n_failed == 5_326
    assert len(table.obs_hour) == 644_569
    makers, counts = np.unique(table.maker, return_counts=True)
    assert dict(zip(makers, counts, strict=True)) == {"ST": 53_344, "HGST": 29_910, "WDC": 3_814}
