"""Which (drive, hour, label) points the model learns from and is judged on.

Labels follow the issue's protocol: a failed drive is positive at L days before its last record;
a negative is a healthy drive at a random time at least 30 days before its last record, so its
next 30 days are known to be failure-free. Every draw is seeded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from shadowblk.predict.drives import HOURS_PER_DAY, DriveTable

HORIZON_DAYS = 30


@dataclass(frozen=True)
class Points:
    """Drive indexes, power-on hours and 0/1 labels (fails within the horizon)."""

    drive: np.ndarray
    hour: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.drive)

    @classmethod
    def join(cls, parts: list[Points]) -> Points:
        return cls(
            drive=np.concatenate([p.drive for p in parts]).astype(np.int64),
            hour=np.concatenate([p.hour for p in parts]),
            label=np.concatenate([p.label for p in parts]).astype(np.int8),
        )


def held_out(serials: np.ndarray, fraction: float, salt: str) -> np.ndarray:
    """True for the drives in the held-out share: decided by a hash of the serial alone.

    A drive is on the same side in every run and every file, so `evaluate` can tell which
    drives a model never saw from the serials alone.
    """
    cut = int(fraction * 2**64)
    return np.array([_hash64(f"{salt}:{s}") < cut for s in serials], dtype=bool)


def fold_of(serials: np.ndarray, folds: int, salt: str) -> np.ndarray:
    """Fold index in [0, FOLDS) per drive, decided by a hash of the serial alone."""
    return np.array([_hash64(f"{salt}:{s}") % folds for s in serials], dtype=np.int64)


def _hash64(text: str) -> int:
    """A 64-bit hash with no linear relation between salts (unlike a CRC)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def healthy_window(
    table: DriveTable, since_day: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per drive, the hours whose next HORIZON_DAYS are on record: [start, end - horizon]."""
    lo = table.start_hour
    if since_day is not None:
        lo = np.maximum(lo, table.hour_at(np.arange(len(table)), since_day))
    return lo, table.end_hour - HORIZON_DAYS * HOURS_PER_DAY


def training_points(
    table: DriveTable,
    rng: np.random.Generator,
    per_failure: int = 4,
    per_drive: int = 2,
    failed_past: bool = True,
) -> Points:
    """Positives at lead times drawn uniformly in [0, 30] days; negatives at random safe times.

    Failed drives also give negatives from their healthy past, which teaches the model that an
    old problem is not by itself an imminent failure.
    """
    failed = np.flatnonzero(table.failed)
    pos_drive = np.repeat(failed, per_failure)
    lead = rng.uniform(0, HORIZON_DAYS, len(pos_drive)) * HOURS_PER_DAY
    pos_hour = table.end_hour[pos_drive] - lead
    ok = pos_hour >= table.start_hour[pos_drive]
    lo, hi = healthy_window(table)
    usable = np.flatnonzero((hi >= lo) & (failed_past | ~table.failed))
    neg_drive = np.repeat(usable, per_drive)
    neg_hour = rng.uniform(lo[neg_drive], hi[neg_drive])
    return Points.join(
        [
            Points(pos_drive[ok], pos_hour[ok], np.ones(ok.sum())),
            Points(neg_drive, neg_hour, np.zeros(len(neg_drive))),
        ]
    )


def protocol_points(
    table: DriveTable, lead_days: float, rng: np.random.Generator, since_day: float | None = None
) -> Points:
    """The issue's evaluation set for one lead time L.

    Positives: every failed drive at L days before its last record (if it was on record then).
    Negatives: every healthy drive with 30 days to spare, once, at a random time. With
    SINCE_DAY (out-of-time test) only failures from that day on count, and negatives are drawn
    from that day on.
    """
    failed = np.flatnonzero(table.failed)
    pos_hour = table.end_hour[failed] - lead_days * HOURS_PER_DAY
    ok = pos_hour >= table.start_hour[failed]
    lo, hi = healthy_window(table, since_day)
    if since_day is not None:
        ok &= table.day_at(failed, table.end_hour[failed]) >= since_day
    healthy = np.flatnonzero(~table.failed & (hi >= lo))
    neg_hour = rng.uniform(lo[healthy], hi[healthy])
    return Points.join(
        [
            Points(failed[ok], pos_hour[ok], np.ones(ok.sum())),
            Points(healthy, neg_hour, np.zeros(len(healthy))),
        ]
    )


def fleet_points(
    table: DriveTable,
    rng: np.random.Generator,
    every_days: float = 60,
    since_day: float | None = None,
) -> Points:
    """Drive-times drawn in proportion to time on record, labelled by what the next 30 days held.

    This is the population a live fleet scores every day, so a probability calibrated here
    means what it says: of drives scored 0.2, about a fifth fail within 30 days. Healthy drives
    are drawn only where their next 30 days are on record; SINCE_DAY as in protocol_points.
    """
    lo, _ = healthy_window(table, since_day)
    hi = np.where(table.failed, table.end_hour, table.end_hour - HORIZON_DAYS * HOURS_PER_DAY)
    span = np.maximum(hi - lo, 0.0)
    count = rng.poisson(span / (every_days * HOURS_PER_DAY))
    drive = np.repeat(np.arange(len(table)), count)
    hour = rng.uniform(lo[drive], np.maximum(hi[drive], lo[drive]))
    label = table.failed[drive] & (table.end_hour[drive] - hour <= HORIZON_DAYS * HOURS_PER_DAY)
    return Points(drive.astype(np.int64), hour, label.astype(np.int8))
