"""The in-memory form every predictor part shares: drives and their SMART change history.

Both input formats (Backblaze's start-stop extract and its daily CSVs) reduce to the same
thing: per drive, the power-on hours at which its tracked SMART raw values changed and the
values from then on, plus when its record ends and whether it ended in a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: SMART attributes the predictor tracks (raw values); the Backblaze extract keeps exactly these.
ATTRIBUTES: tuple[int, ...] = (5, 10, 12, 187, 188, 189, 196, 197, 198)
#: Backblaze's published rule: a drive is at risk when any of these raw values is above 0.
RULE_ATTRIBUTES: tuple[int, ...] = (5, 187, 188, 197, 198)
HOURS_PER_DAY = 24.0


def maker_of(model: str) -> str:
    """The manufacturer code used by the extract (ST, HGST, WDC) from a model string."""
    name = model.strip().upper()
    if name.startswith("ST"):
        return "ST"
    if name.startswith(("HGST", "HITACHI")):
        return "HGST"
    if name.startswith("WDC"):
        return "WDC"
    return name.split(" ")[0] if name else "UNKNOWN"


@dataclass(frozen=True)
class DriveTable:
    """Drives (index d) and their observations (rows), rows grouped by drive in time order.

    Row r of drive d holds the raw values in force from ``obs_hour[r]`` on; rows of drive d are
    ``offsets[d]:offsets[d + 1]``. ``start_day`` is the calendar day (days since 1970-01-01)
    at ``start_hour``; the drive is assumed powered on all the time in between.
    """

    serial: np.ndarray  # (n_drives,) str
    model: np.ndarray  # (n_drives,) str
    maker: np.ndarray  # (n_drives,) str
    capacity_tb: np.ndarray  # (n_drives,) float, NaN when unknown
    start_hour: np.ndarray  # (n_drives,) float
    end_hour: np.ndarray  # (n_drives,) float: the latest record
    start_day: np.ndarray  # (n_drives,) float
    failed: np.ndarray  # (n_drives,) bool: the record ends with a failure
    offsets: np.ndarray  # (n_drives + 1,) int64
    obs_hour: np.ndarray  # (n_rows,) float
    obs_values: np.ndarray  # (n_rows, len(ATTRIBUTES)) float, NaN = not reported

    def __len__(self) -> int:
        return len(self.serial)

    @property
    def n_failed(self) -> int:
        return int(self.failed.sum())

    def drive_of_row(self) -> np.ndarray:
        """The drive index of every row."""
        return np.repeat(np.arange(len(self)), np.diff(self.offsets))

    def day_at(self, drive: np.ndarray, hour: np.ndarray) -> np.ndarray:
        """Calendar day (days since epoch) of drive(s) at power-on hour(s)."""
        return self.start_day[drive] + (hour - self.start_hour[drive]) / HOURS_PER_DAY

    def hour_at(self, drive: np.ndarray, day: float | np.ndarray) -> np.ndarray:
        """Power-on hour of drive(s) on a calendar day (inverse of day_at)."""
        return self.start_hour[drive] + (day - self.start_day[drive]) * HOURS_PER_DAY

    def subset(self, mask: np.ndarray) -> DriveTable:
        """The drives where MASK is true, with their rows."""
        keep = np.flatnonzero(mask)
        counts = np.diff(self.offsets)[keep]
        rows = np.flatnonzero(np.asarray(mask, dtype=bool)[self.drive_of_row()])
        return DriveTable(
            serial=self.serial[keep],
            model=self.model[keep],
            maker=self.maker[keep],
            capacity_tb=self.capacity_tb[keep],
            start_hour=self.start_hour[keep],
            end_hour=self.end_hour[keep],
            start_day=self.start_day[keep],
            failed=self.failed[keep],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            obs_hour=self.obs_hour[rows],
            obs_values=self.obs_values[rows],
        )

    def censor(self, day: float) -> DriveTable:
        """The table as it was known before calendar DAY: later rows, failures and drives dropped.

        This is what an out-of-time split trains on, so no label comes from after DAY.
        """
        drive = np.arange(len(self))
        cut_hour = self.hour_at(drive, day)
        end_day = self.day_at(drive, self.end_hour)
        row_drive = self.drive_of_row()
        row_keep = self.obs_hour < cut_hour[row_drive]
        counts = np.bincount(row_drive[row_keep], minlength=len(self))
        keep = counts > 0
        table = DriveTable(
            serial=self.serial,
            model=self.model,
            maker=self.maker,
            capacity_tb=self.capacity_tb,
            start_hour=self.start_hour,
            end_hour=np.minimum(self.end_hour, cut_hour),
            start_day=self.start_day,
            failed=self.failed & (end_day < day),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            obs_hour=self.obs_hour[row_keep],
            obs_values=self.obs_values[row_keep],
        )
        return table.subset(keep)


def concat(tables: list[DriveTable]) -> DriveTable:
    """One table from several; a serial may appear in only one of them."""
    if len(tables) == 1:
        return tables[0]
    serial = np.concatenate([t.serial for t in tables])
    uniq, counts = np.unique(serial, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        raise ValueError(f"drive {dup} appears in more than one start-stop input")
    shift = np.cumsum([0] + [len(t.obs_hour) for t in tables[:-1]])
    return DriveTable(
        serial=serial,
        model=np.concatenate([t.model for t in tables]),
        maker=np.concatenate([t.maker for t in tables]),
        capacity_tb=np.concatenate([t.capacity_tb for t in tables]),
        start_hour=np.concatenate([t.start_hour for t in tables]),
        end_hour=np.concatenate([t.end_hour for t in tables]),
        start_day=np.concatenate([t.start_day for t in tables]),
        failed=np.concatenate([t.failed for t in tables]),
        offsets=np.concatenate(
            [[0]] + [t.offsets[1:] + s for t, s in zip(tables, shift, strict=True)]
        ).astype(np.int64),
        obs_hour=np.concatenate([t.obs_hour for t in tables]),
        obs_values=np.concatenate([t.obs_values for t in tables]),
    )
