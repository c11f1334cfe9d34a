"""Replaying a drive's recorded daily SMART series, one observation a day, through the model.

This is what an agent does live with `smartctl -j` output: one reading per day per disk. A
Backblaze daily CSV of one drive stands in for that series in tests and demos.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shadowblk.predict.drives import ATTRIBUTES
from shadowblk.predict.loaders import (
    DAILY_REQUIRED,
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


def replay(path: Path, serial: str | None = None) -> Iterator[SmartObservation]:
    """The observations of one drive in a daily CSV, in date order.

    A file with several drives needs SERIAL to pick one.
    """
    cols = read_columns(path)
    require(path, cols, DAILY_REQUIRED, "daily")
    serials = text(cols, "serial_number")
    if serial is None:
        found = np.unique(serials)
        if len(found) != 1:
            raise DataFormatError(f"{path}: {len(found)} drives; name the one to replay")
        serial = str(found[0])
    rows = np.flatnonzero(serials == serial)
    if not len(rows):
        raise DataFormatError(f"{path}: no drive {serial!r}")
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


class DriveScorer:
    """Keeps one drive's observations and scores it after each new day."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.seen: list[SmartObservation] = []

    def observe(self, obs: SmartObservation) -> dict[str, Any]:
        """Add today's reading; return the drive's score as `predict score` reports it."""
        if self.seen and (obs.serial != self.seen[0].serial or obs.day < self.seen[-1].day):
            raise ValueError("observations must be of one drive, in date order")
        self.seen.append(obs)
        n = len(self.seen)
        day = np.array([o.day for o in self.seen], dtype=float)
        raw_hours = np.array(
            [np.nan if o.power_on_hours is None else o.power_on_hours for o in self.seen]
        )
        bounds = np.array([0, n], dtype=np.int64)
        values = np.array(
            [
                [np.nan if o.values.get(a) is None else o.values[a] for a in ATTRIBUTES]
                for o in self.seen
            ]
        )
        table = compress_daily(
            serial=np.array([o.serial for o in self.seen]),
            model=np.array([o.model for o in self.seen]),
            day=day,
            fail=np.zeros(n),  # a failure flag is an outcome, never an input to the score
            hours=fill_hours(raw_hours, day, bounds),
            capacity=np.array(
                [np.nan if o.capacity_tb is None else o.capacity_tb for o in self.seen]
            ),
            values=values,
            bounds=bounds,
        )
        return score_latest(self.model, table)[0]
