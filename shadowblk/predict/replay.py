"""Replaying a drive's recorded daily SMART series, one observation a day, through the model.

This is what an agent does live with `smartctl -j` output: one reading per day per disk. A
Backblaze daily CSV of one drive, or one drive of the start-stop extract in shared/data
(expanded back into one reading a day), stands in for that series in labs and tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shadowblk.predict.drives import ATTRIBUTES, HOURS_PER_DAY
from shadowblk.predict.loaders import (
    DAILY_REQUIRED,
    START_STOP_REQUIRED,
    DataFormatError,
    attribute_matrix,
    compress_daily,
    days,
    fill_hours,
    numbers,
    read_columns,
    require,
    text,
)
from shadowblk.predict.model import Model
from shadowblk.predict.scoring import score_latest


@dataclass(frozen=True)
class SmartObservation:
    """One day's SMART reading of one drive (raw values; None = not reported)."""

    serial: str
    model: str
    day: int  # days since 1970-01-01
    power_on_hours: float | None
    capacity_tb: float | None
    values: dict[int, float | None]
    failure: bool

    @property
    def date(self) -> str:
        return str(np.datetime64(self.day, "D"))


def _opt(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def _pick(path: Path, serials: np.ndarray, serial: str | None) -> tuple[str, np.ndarray]:
    """SERIAL (the only drive when None) and its row indexes."""
    if serial is None:
        found = np.unique(serials)
        if len(found) != 1:
            raise DataFormatError(f"{path}: {len(found)} drives; name the one to replay")
        serial = str(found[0])
    rows = np.flatnonzero(serials == serial)
    if not len(rows):
        raise DataFormatError(f"{path}: no drive {serial!r}")
    return serial, rows


def replay(path: Path, serial: str | None = None) -> Iterator[SmartObservation]:
    """The observations of one drive in a daily or start-stop CSV, one a day, in date order.

    A file with several drives needs SERIAL to pick one.
    """
    cols = read_columns(path)
    if "tstart" in cols or "tstop" in cols:
        return _replay_start_stop(path, cols, serial)
    return _replay_daily(path, cols, serial)


def _replay_daily(path: Path, cols: pd.DataFrame, serial: str | None) -> Iterator[SmartObservation]:
    require(path, cols, DAILY_REQUIRED, "daily")
    serial, rows = _pick(path, text(cols, "serial_number"), serial)
    day = days(path, cols, "date")[rows]
    n = len(cols)
    hours = numbers(path, cols, "smart_9_raw") if "smart_9_raw" in cols else np.full(n, np.nan)
    cap = (
        numbers(path, cols, "capacity_bytes") / 1e12
        if "capacity_bytes" in cols
        else np.full(n, np.nan)
    )
    fail = numbers(path, cols, "failure", allow_missing=False)[rows]
    values = attribute_matrix(path, cols, "_raw")[rows]
    model = text(cols, "model")[rows]
    for i in np.argsort(day, kind="stable"):
        r = rows[i]
        yield SmartObservation(
            serial=serial,
            model=str(model[i]),
            day=int(day[i]),
            power_on_hours=_opt(hours[r]),
            capacity_tb=_opt(cap[r]),
            values={a: _opt(values[i, j]) for j, a in enumerate(ATTRIBUTES)},
            failure=bool(fail[i]),
        )


def _replay_start_stop(
    path: Path, cols: pd.DataFrame, serial: str | None
) -> Iterator[SmartObservation]:
    """A start-stop drive as one reading a day: the values in force at each day's hour,
    counted back from its last record (so the last reading is the record's end, its failure
    day for a failed drive)."""
    require(path, cols, START_STOP_REQUIRED, "start-stop")
    serial, rows = _pick(path, text(cols, "serial_number"), serial)
    tstart = numbers(path, cols, "tstart", allow_missing=False)[rows]
    order = np.argsort(tstart, kind="stable")
    rows, tstart = rows[order], tstart[order]
    tstop = numbers(path, cols, "tstop", allow_missing=False)[rows]
    min_hours = numbers(path, cols, "min_hours", allow_missing=False)[rows[0]]
    first_day = days(path, cols, "min_date")[rows[0]]
    failed = bool(numbers(path, cols, "fails", allow_missing=False)[rows].max() > 0)
    size = numbers(path, cols, "size_tb")[rows[0]] if "size_tb" in cols else np.nan
    values = attribute_matrix(path, cols, "")[rows]
    model = str(text(cols, "model")[rows[0]])
    span = int((tstop[-1] - tstart[0]) // HOURS_PER_DAY)
    for back in range(span, -1, -1):
        hour = tstop[-1] - back * HOURS_PER_DAY
        row = min(int(np.searchsorted(tstop, hour, side="left")), len(rows) - 1)
        yield SmartObservation(
            serial=serial,
            model=model,
            day=int(first_day + (hour - min_hours) // HOURS_PER_DAY),
            power_on_hours=float(hour),
            capacity_tb=_opt(size),
            values={a: _opt(values[row, j]) for j, a in enumerate(ATTRIBUTES)},
            failure=failed and back == 0,
        )


def score_series(model: Model, seen: list[SmartObservation]) -> dict[str, Any]:
    """One drive's score after its observations SEEN (one drive, in date order), as `predict
    score` reports it."""
    n = len(seen)
    day = np.array([o.day for o in seen], dtype=float)
    raw_hours = np.array([np.nan if o.power_on_hours is None else o.power_on_hours for o in seen])
    bounds = np.array([0, n], dtype=np.int64)
    values = np.array(
        [[np.nan if o.values.get(a) is None else o.values[a] for a in ATTRIBUTES] for o in seen]
    )
    table = compress_daily(
        serial=np.array([o.serial for o in seen]),
        model=np.array([o.model for o in seen]),
        day=day,
        fail=np.zeros(n),  # a failure flag is an outcome, never an input to the score
        hours=fill_hours(raw_hours, day, bounds),
        capacity=np.array([np.nan if o.capacity_tb is None else o.capacity_tb for o in seen]),
        values=values,
        bounds=bounds,
    )
    return score_latest(model, table)[0]


class DriveScorer:
    """Keeps one drive's observations and scores it after each new day."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.seen: list[SmartObservation] = []

    def observe(self, obs: SmartObservation) -> dict[str, Any]:
        """Add today's reading; return the drive's score as `predict score` reports it."""
        if self.seen and (obs.serial != self.seen[0].serial or obs.day < self.seen[-1].day):
            raise ValueError("observations must be of one drive, in date order")
        if self.seen and obs.day == self.seen[-1].day:
            self.seen.pop()  # a later reading of the same day replaces the earlier one
        self.seen.append(obs)
        return score_series(self.model, self.seen)
