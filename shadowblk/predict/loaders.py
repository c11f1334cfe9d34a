"""Reading SMART history: Backblaze's start-stop extract and its daily CSV format.

The format is recognised from the header. Attribute columns may be absent (not every vendor
reports every attribute); identity and time columns may not, and a value that is not a number
is an error that names the file, the column and the line.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from shadowblk.predict.drives import ATTRIBUTES, HOURS_PER_DAY, DriveTable, concat, maker_of

START_STOP_REQUIRED = (
    "serial_number",
    "model",
    "min_date",
    "min_hours",
    "tstart",
    "tstop",
    "fails",
)
DAILY_REQUIRED = ("date", "serial_number", "model", "failure")
TEXT_COLUMNS = ("serial_number", "model", "manufacturer", "date", "min_date", "max_date")


class DataFormatError(ValueError):
    """The input is not SMART history in a format the predictor reads."""


def read_columns(path: Path) -> pd.DataFrame:
    """The CSV at PATH (plain or .gz) with header names stripped; text columns kept as text."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                path,
                dtype={c: str for c in TEXT_COLUMNS},
                keep_default_na=False,
                na_values=[""],
                index_col=False,
            )
    except pd.errors.ParserWarning as exc:
        raise DataFormatError(
            f"{path}: cannot read as CSV: a row has more fields than the header"
        ) from exc
    except FileNotFoundError as exc:
        raise DataFormatError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataFormatError(f"{path}: cannot read as CSV: {exc}") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataFormatError(f"{path}: empty file, expected a CSV header") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def numbers(path: Path, cols: pd.DataFrame, name: str, allow_missing: bool = True) -> np.ndarray:
    """Column NAME as floats (NaN where empty); a clear error at the first non-number."""
    col = cols[name]
    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values) & col.notna().to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise DataFormatError(
            f"{path}, line {i + 2}: column {name!r} is {col.iloc[i]!r}, not a number"
        )
    if not allow_missing and np.isnan(values).any():
        i = int(np.argmax(np.isnan(values)))
        raise DataFormatError(f"{path}, line {i + 2}: column {name!r} is empty")
    return values


def days(path: Path, cols: pd.DataFrame, name: str) -> np.ndarray:
    """Column NAME (ISO dates YYYY-MM-DD) as days since 1970-01-01."""
    col = cols[name]
    parsed = pd.to_datetime(col, format="%Y-%m-%d", errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise DataFormatError(
            f"{path}, line {i + 2}: column {name!r} is {col.iloc[i]!r}, not a date YYYY-MM-DD"
        )
    return (parsed.to_numpy().astype("datetime64[D]").astype(np.int64)).astype(np.float64)


def text(cols: pd.DataFrame, name: str) -> np.ndarray:
    return cols[name].fillna("").astype(str).to_numpy(dtype=str)


def attribute_matrix(path: Path, cols: pd.DataFrame, suffix: str) -> np.ndarray:
    """The tracked SMART raw values, NaN for attributes this file does not carry."""
    n = len(cols)
    present = [a for a in ATTRIBUTES if f"smart_{a}{suffix}" in cols]
    if not present:
        names = ", ".join(f"smart_{a}{suffix}" for a in ATTRIBUTES)
        raise DataFormatError(f"{path}: no SMART attribute column; expected some of {names}")
    out = np.full((n, len(ATTRIBUTES)), np.nan)
    for j, a in enumerate(ATTRIBUTES):
        name = f"smart_{a}{suffix}"
        if name in cols:
            out[:, j] = numbers(path, cols, name)
    return out


def require(path: Path, cols: pd.DataFrame, names: Sequence[str], kind: str) -> None:
    missing = [c for c in names if c not in cols]
    if missing:
        raise DataFormatError(f"{path}: {kind} CSV without column(s) {', '.join(missing)}")


def group_starts(keys: np.ndarray) -> np.ndarray:
    """Indexes where a run of equal KEYS begins, plus len(KEYS)."""
    change = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    return np.concatenate([[0], change, [len(keys)]]).astype(np.int64)


def load_start_stop(path: Path, cols: pd.DataFrame) -> DriveTable:
    """The extract in shared/data: one row per interval (tstart, tstop] of unchanged values."""
    require(path, cols, START_STOP_REQUIRED, "start-stop")
    serial = text(cols, "serial_number")
    tstart = numbers(path, cols, "tstart", allow_missing=False)
    tstop = numbers(path, cols, "tstop", allow_missing=False)
    fails = numbers(path, cols, "fails", allow_missing=False)
    min_hours = numbers(path, cols, "min_hours", allow_missing=False)
    min_day = days(path, cols, "min_date")
    values = attribute_matrix(path, cols, "")
    order = np.lexsort((tstart, serial))
    serial, tstart, tstop, fails = serial[order], tstart[order], tstop[order], fails[order]
    values, min_hours, min_day = values[order], min_hours[order], min_day[order]
    bounds = group_starts(serial)
    first, last = bounds[:-1], bounds[1:] - 1
    model = text(cols, "model")[order][first]
    if "manufacturer" in cols:
        maker = text(cols, "manufacturer")[order][first]
    else:
        maker = np.array([maker_of(m) for m in model], dtype=str)
    size = (
        numbers(path, cols, "size_tb")[order][first]
        if "size_tb" in cols
        else np.full(len(first), np.nan)
    )
    failed = np.maximum.reduceat(fails, first) > 0
    return DriveTable(
        serial=serial[first],
        model=model,
        maker=maker,
        capacity_tb=size,
        start_hour=tstart[first],
        end_hour=tstop[last],
        start_day=min_day[first] + (tstart[first] - min_hours[first]) / HOURS_PER_DAY,
        failed=failed,
        offsets=bounds,
        obs_hour=tstart,
        obs_values=values,
    )


def load_daily(paths: Sequence[Path], tables: Sequence[pd.DataFrame]) -> DriveTable:
    """Backblaze daily snapshots (one row per drive per day), kept only where a value changed.

    The power-on hours come from smart_9_raw; where it is missing they are counted from the
    dates. Hours never go backwards within a drive (a counter glitch is held at its maximum).
    """
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("serial", "model", "day", "fail")}
    parts |= {"hours": [], "values": [], "capacity": []}
    for path, cols in zip(paths, tables, strict=True):
        require(path, cols, DAILY_REQUIRED, "daily")
        n = len(cols)
        parts["serial"].append(text(cols, "serial_number"))
        parts["model"].append(text(cols, "model"))
        parts["day"].append(days(path, cols, "date"))
        parts["fail"].append(numbers(path, cols, "failure", allow_missing=False))
        parts["hours"].append(
            numbers(path, cols, "smart_9_raw") if "smart_9_raw" in cols else np.full(n, np.nan)
        )
        parts["capacity"].append(
            numbers(path, cols, "capacity_bytes") / 1e12
            if "capacity_bytes" in cols
            else np.full(n, np.nan)
        )
        parts["values"].append(attribute_matrix(path, cols, "_raw"))
    serial = np.concatenate(parts["serial"])
    day = np.concatenate(parts["day"])
    order = np.lexsort((day, serial))
    serial, day = serial[order], day[order]
    model = np.concatenate(parts["model"])[order]
    fail = np.concatenate(parts["fail"])[order]
    hours = np.concatenate(parts["hours"])[order]
    capacity = np.concatenate(parts["capacity"])[order]
    values = np.concatenate(parts["values"])[order]
    bounds = group_starts(serial)
    hours = fill_hours(hours, day, bounds)
    return compress_daily(serial, model, day, fail, hours, capacity, values, bounds)


def fill_hours(hours: np.ndarray, day: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Power-on hours per row: reported where possible, else extrapolated from the dates."""
    out = hours.copy()
    for a, b in itertools.pairwise(bounds):
        h = out[a:b]
        known = ~np.isnan(h)
        anchor = (
            (h[known][0] - day[a:b][known][0] * HOURS_PER_DAY)
            if known.any()
            else -day[a] * HOURS_PER_DAY
        )
        h[~known] = day[a:b][~known] * HOURS_PER_DAY + anchor
        out[a:b] = np.maximum.accumulate(h)
    return out


def compress_daily(
    serial: np.ndarray,
    model: np.ndarray,
    day: np.ndarray,
    fail: np.ndarray,
    hours: np.ndarray,
    capacity: np.ndarray,
    values: np.ndarray,
    bounds: np.ndarray,
) -> DriveTable:
    """Keep a drive's first row and each row where a tracked value changed (start-stop form)."""
    first, last = bounds[:-1], bounds[1:] - 1
    same = (values[1:] == values[:-1]) | (np.isnan(values[1:]) & np.isnan(values[:-1]))
    changed = np.concatenate([[True], ~same.all(axis=1)])
    changed[first] = True
    keep = np.flatnonzero(changed)
    drive = np.repeat(np.arange(len(first)), np.diff(bounds))
    counts = np.bincount(drive[keep], minlength=len(first))
    model_first = model[first]
    return DriveTable(
        serial=serial[first],
        model=model_first,
        maker=np.array([maker_of(m) for m in model_first], dtype=str),
        capacity_tb=np.fmax.reduceat(capacity, first),
        start_hour=hours[first],
        end_hour=hours[last],
        start_day=day[first],
        failed=np.maximum.reduceat(fail, first) > 0,
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        obs_hour=hours[keep],
        obs_values=values[keep],
    )


def load_drives(paths: Iterable[str | Path]) -> DriveTable:
    """Read every file (start-stop or daily, plain or .gz) into one DriveTable.

    Daily files are pooled first, so a drive spread over many one-day files becomes one drive.
    """
    start_stop: list[DriveTable] = []
    daily_paths: list[Path] = []
    daily_cols: list[pd.DataFrame] = []
    for raw in paths:
        path = Path(raw)
        cols = read_columns(path)
        if "tstart" in cols or "tstop" in cols:
            start_stop.append(load_start_stop(path, cols))
        elif "date" in cols or "failure" in cols:
            daily_paths.append(path)
            daily_cols.append(cols)
        else:
            raise DataFormatError(
                f"{path}: not SMART history: expected a start-stop CSV "
                f"({', '.join(START_STOP_REQUIRED)}, smart_N...) or a Backblaze daily CSV "
                f"({', '.join(DAILY_REQUIRED)}, smart_N_raw...); found columns "
                f"{', '.join(list(cols)[:12])}"
            )
    tables = list(start_stop)
    if daily_paths:
        tables.append(load_daily(daily_paths, daily_cols))
    if not tables:
        raise DataFormatError("no input file given")
    table = concat(tables)
    if len(table) == 0:
        raise DataFormatError("the input holds no drive")
    return table
