"""Features of a drive at power-on hour t, built only from what was known at t.

Per SMART attribute: its value, its maximum so far, how often it rose (ever and in the last 7
and 30 days), hours since it was first non-zero and since it last rose, and its change over
the last 7 and 30 days. Per drive: age,
time observed, how often anything changed, Backblaze's rule, capacity, and the failure rates of
its model and maker (learned on the training drives and stored in the model file).

A training drive must not see its own outcome in those rates (a model with few drives would
otherwise be "learned" from the very failures the trees are fitted on), so training drives get
out-of-fold rates: the drives are split into folds by a hash of the serial and each drive's
rates come from the other folds only. Every other drive uses the rates of all training drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shadowblk.predict.drives import ATTRIBUTES, HOURS_PER_DAY, RULE_ATTRIBUTES, DriveTable
from shadowblk.predict.sampling import fold_of

HOURS_PER_YEAR = 8766.0
WINDOWS_DAYS = (7, 30)
MAKERS = ("ST", "HGST", "WDC")
#: Drive-years of pseudo-exposure that smooth a rate: a maker's towards the fleet's rate, a
#: model's towards its maker's.
PRIOR_DRIVE_YEARS = 20.0
#: Folds (by a hash of the serial) for the training drives' out-of-fold rates.
RATE_FOLDS = 5
_HOUR_SCALE = 1e7  # power-on hours stay far below this (20 years is 175,320 hours)


def feature_names() -> list[str]:
    """The columns of the feature matrix, in order; stored in the model file."""
    names = []
    for a in ATTRIBUTES:
        names += [f"smart_{a}", f"smart_{a}_max", f"smart_{a}_increases"]
        names += [f"smart_{a}_hours_since_nonzero", f"smart_{a}_hours_since_increase"]
        names += [f"smart_{a}_change_{w}d" for w in WINDOWS_DAYS]
        names += [f"smart_{a}_increases_{w}d" for w in WINDOWS_DAYS]
    names += ["power_on_hours", "hours_observed", "changes", "changes_per_day"]
    names += ["hours_since_change", "rule_flag", "rule_log_sum", "rule_attributes_nonzero"]
    names += [f"rule_increases_{w}d" for w in WINDOWS_DAYS] + ["capacity_tb"]
    names += ["model_failure_rate", "maker_failure_rate"]
    names += [f"maker_{m}" for m in MAKERS]
    return names


@dataclass(frozen=True)
class FleetRates:
    """Annual failure rates per model and maker, smoothed towards the fleet's rate."""

    fleet: float
    model: dict[str, float]
    maker: dict[str, float]

    @classmethod
    def fit(cls, table: DriveTable) -> FleetRates:
        years = (table.end_hour - table.start_hour) / HOURS_PER_YEAR
        return cls.from_arrays(table.model, table.maker, table.failed, years)

    @classmethod
    def from_arrays(
        cls, model: np.ndarray, maker: np.ndarray, failed: np.ndarray, years: np.ndarray
    ) -> FleetRates:
        """Rates from per-drive model, maker, outcome and years on record.

        A maker's rate is smoothed towards the fleet's, a model's towards its maker's, each
        with PRIOR_DRIVE_YEARS of pseudo-exposure.
        """
        fails = np.asarray(failed, dtype=float)
        fleet = float(fails.sum() / max(years.sum(), 1e-9))

        def per(keys: np.ndarray, prior: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
            uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            n = np.bincount(inverse, weights=fails, minlength=len(uniq))
            exposure = np.bincount(inverse, weights=years, minlength=len(uniq))
            if not np.isscalar(prior):  # the prior of each key: that of its first drive
                prior = np.asarray(prior)[first]
            rate = (n + PRIOR_DRIVE_YEARS * prior) / (exposure + PRIOR_DRIVE_YEARS)
            return uniq, np.round(rate, 6)

        maker_keys, maker_rate = per(maker, fleet)
        maker_of_drive = maker_rate[np.searchsorted(maker_keys, maker)]
        model_keys, model_rate = per(model, maker_of_drive)
        return cls(
            fleet=round(fleet, 6),
            model={str(k): float(r) for k, r in zip(model_keys, model_rate, strict=True)},
            maker={str(k): float(r) for k, r in zip(maker_keys, maker_rate, strict=True)},
        )

    def lookup(self, table: DriveTable) -> tuple[np.ndarray, np.ndarray]:
        """(model rate, maker rate) per drive; unknown models fall back to their maker."""
        return self._lookup(table.model, table.maker)

    def _lookup(self, models: np.ndarray, makers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maker = np.array([self.maker.get(m, self.fleet) for m in makers], dtype=float)
        model = np.array(
            [self.model.get(m, mk) for m, mk in zip(models, maker, strict=True)], dtype=float
        )
        return model, maker

    @classmethod
    def out_of_fold(
        cls, table: DriveTable, salt: str, folds: int = RATE_FOLDS
    ) -> tuple[np.ndarray, np.ndarray]:
        """(model rate, maker rate) per drive of TABLE, each from the drives of other folds.

        The folds are decided by a hash of the serial with SALT, so a seed gives the same
        folds every run. A model seen only in the drive's own fold falls back to its maker.
        """
        fold = fold_of(table.serial, folds, salt)
        years = (table.end_hour - table.start_hour) / HOURS_PER_YEAR
        model = np.zeros(len(table))
        maker = np.zeros(len(table))
        for k in range(folds):
            inside = fold == k
            if not inside.any():
                continue
            rest = ~inside
            rates = cls.from_arrays(
                table.model[rest], table.maker[rest], table.failed[rest], years[rest]
            )
            model[inside], maker[inside] = rates._lookup(table.model[inside], table.maker[inside])
        return model, maker

    def to_json(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "model": self.model, "maker": self.maker}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FleetRates:
        return cls(fleet=float(doc["fleet"]), model=dict(doc["model"]), maker=dict(doc["maker"]))


class History:
    """Running summaries per row of a DriveTable, so any (drive, t) is a few array lookups."""

    def __init__(
        self,
        table: DriveTable,
        rates: FleetRates,
        drive_rates: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """DRIVE_RATES, when given, replaces RATES' (model rate, maker rate) per drive: the
        out-of-fold rates of the drives being trained on."""
        self.table = table
        v = table.obs_values
        rows = np.arange(len(v))
        drive = table.drive_of_row()
        first_row = table.offsets[:-1][drive]
        self.keys = drive * _HOUR_SCALE + table.obs_hour
        rose = np.zeros(v.shape, dtype=bool)
        rose[1:] = v[1:] > v[:-1]
        rose[rows == first_row] = False
        counts = np.cumsum(rose, axis=0)
        self.increases = counts - counts[first_row]
        last = np.maximum.accumulate(np.where(rose, rows[:, None], -1), axis=0)
        self.last_increase = np.where(last >= first_row[:, None], last, -1)
        never = len(v)
        nonzero_at = np.where(v > 0, rows[:, None], never)
        first_nonzero = np.minimum.reduceat(nonzero_at, table.offsets[:-1], axis=0)[drive]
        self.first_nonzero = np.where(first_nonzero <= rows[:, None], first_nonzero, -1)
        self.running_max = np.column_stack(
            [_grouped_max(v[:, j], drive) for j in range(v.shape[1])]
        )
        self.model_rate, self.maker_rate = drive_rates or rates.lookup(table)

    def row_at(self, drive: np.ndarray, hour: np.ndarray) -> np.ndarray:
        """The row in force at HOUR for each DRIVE (its first row for hours before it)."""
        row = np.searchsorted(self.keys, drive * _HOUR_SCALE + hour, side="right") - 1
        return np.maximum(row, self.table.offsets[:-1][drive])

    def features(self, drive: np.ndarray, hour: np.ndarray) -> np.ndarray:
        """The feature matrix (len(drive), len(feature_names())) for drives at hours."""
        t = self.table
        drive = np.asarray(drive, dtype=np.int64)
        hour = np.asarray(hour, dtype=np.float64)
        row = self.row_at(drive, hour)
        v = t.obs_values[row]
        hours = t.obs_hour
        cols = []
        past_rows = [self.row_at(drive, hour - w * HOURS_PER_DAY) for w in WINDOWS_DAYS]
        past = [t.obs_values[r] for r in past_rows]
        recent = [(self.increases[row] - self.increases[r]).astype(float) for r in past_rows]
        for j in range(len(ATTRIBUTES)):
            first = self.first_nonzero[row, j]
            last = self.last_increase[row, j]
            cols += [v[:, j], self.running_max[row, j], self.increases[row, j].astype(float)]
            cols.append(np.where(first >= 0, hour - hours[np.maximum(first, 0)], np.nan))
            cols.append(np.where(last >= 0, hour - hours[np.maximum(last, 0)], np.nan))
            cols += [v[:, j] - p[:, j] for p in past]
            cols += [r[:, j] for r in recent]
        observed = np.maximum(hour - t.start_hour[drive], 0.0)
        changes = (row - t.offsets[:-1][drive] + 1).astype(float)
        rule_cols = [ATTRIBUTES.index(a) for a in RULE_ATTRIBUTES]
        rule = v[:, rule_cols]
        cols += [hour, observed, changes, changes / (observed / HOURS_PER_DAY + 1.0)]
        cols += [hour - hours[row], (rule > 0).any(axis=1).astype(float)]
        cols += [np.log1p(np.nansum(np.clip(rule, 0, None), axis=1)), (rule > 0).sum(axis=1)]
        cols += [r[:, rule_cols].sum(axis=1) for r in recent] + [t.capacity_tb[drive]]
        cols += [self.model_rate[drive], self.maker_rate[drive]]
        cols += [(t.maker[drive] == m).astype(float) for m in MAKERS]
        return np.column_stack(cols)


def _grouped_max(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Running maximum of VALUES restarting at each new GROUP (sorted), NaN ignored.

    Values are replaced by their rank, so one accumulate over group-offset ranks does it.
    """
    finite = ~np.isnan(values)
    uniq, inverse = np.unique(values[finite], return_inverse=True)
    rank = np.zeros(len(values), dtype=np.int64)
    rank[finite] = inverse + 1
    span = len(uniq) + 1
    best = np.maximum.accumulate(group * span + rank) - group * span
    out = np.full(len(values), np.nan)
    seen = best > 0
    out[seen] = uniq[best[seen] - 1]
    return out
