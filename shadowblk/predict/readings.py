"""A disk's SMART readings as an agent reports them in its heartbeat, and back.

The model scores a disk from its history, not from one reading. The agent keeps that history
(the readings where a tracked value changed, which is all the model keeps of it too) and sends
it with every current reading, so a manager that just started, or took over the leadership,
scores a disk exactly as one that watched it for years, and a lost heartbeat loses nothing.

Device document (one per disk, in `smart.devices`): `model`, `serial`, `capacity_tb`, `day`
(days since 1970-01-01 of the reading), `date`, `power_on_hours`, `attributes` {"5": raw, ...},
`history` [[day, power_on_hours, {"5": raw, ...}], ...] oldest first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shadowblk.predict.drives import ATTRIBUTES
from shadowblk.predict.replay import SmartObservation

MAX_HISTORY = 64  # change points sent per disk: a heartbeat stays small


def _attributes(values: dict[int, float | None]) -> dict[str, float]:
    return {str(a): v for a, v in sorted(values.items()) if v is not None}


class SmartLog:
    """One disk's readings, keeping those where a tracked value changed."""

    def __init__(self) -> None:
        self.changes: list[SmartObservation] = []
        self.latest: SmartObservation | None = None

    def add(self, obs: SmartObservation) -> None:
        """Record today's reading (in day order; a second one on a day replaces the first)."""
        if self.latest is not None and obs.day < self.latest.day:
            raise ValueError("readings must come in day order")
        before = self.changes[-1].values if self.changes else None
        if self.changes and self.changes[-1].day == obs.day:
            self.changes.pop()
            before = self.changes[-1].values if self.changes else None
        if before != obs.values:
            self.changes.append(obs)
            del self.changes[:-MAX_HISTORY]
        self.latest = obs

    def device(self) -> dict[str, Any]:
        """The heartbeat's document of this disk (the latest reading and the history)."""
        obs = self.latest
        if obs is None:
            raise ValueError("no reading yet")
        return {
            "model": obs.model,
            "serial": obs.serial,
            "capacity_tb": obs.capacity_tb,
            "day": obs.day,
            "date": obs.date,
            "power_on_hours": obs.power_on_hours,
            "attributes": _attributes(obs.values),
            "history": [
                [c.day, c.power_on_hours, _attributes(c.values)]
                for c in self.changes
                if c.day < obs.day
            ],
        }


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a number")
    return float(value)


def _values(doc: Any, what: str) -> dict[int, float | None]:
    if not isinstance(doc, dict):
        raise ValueError(f"{what}: attributes must be an object")
    return {a: _number(doc.get(str(a)), f"{what}: attribute {a}") for a in ATTRIBUTES}


def observations(doc: dict[str, Any], today: int) -> list[SmartObservation]:
    """The readings in a device document, oldest first; ValueError names what is wrong.

    A reading without a `day` (a live `smartctl` summary) is today's; its power-on hours come
    from attribute 9 when the document has no `power_on_hours`.
    """
    serial, model = str(doc.get("serial") or "unknown"), str(doc.get("model") or "unknown")
    attrs = doc.get("attributes", {})
    if not isinstance(attrs, dict):
        raise ValueError("reading: attributes must be an object")
    day = _number(doc.get("day", today), "day")
    hours = _number(doc.get("power_on_hours", attrs.get("9")), "power_on_hours")
    capacity = _number(doc.get("capacity_tb"), "capacity_tb")
    history = doc.get("history", [])
    if not isinstance(history, list) or len(history) > MAX_HISTORY:
        raise ValueError(f"history must be a list of at most {MAX_HISTORY} readings")

    def reading(d: float | None, h: float | None, values: Any, what: str) -> SmartObservation:
        if d is None:
            raise ValueError(f"{what}: no day")
        return SmartObservation(serial, model, int(d), h, capacity, _values(values, what), False)

    out = []
    for i, entry in enumerate(history):
        if not isinstance(entry, list) or len(entry) != 3:
            raise ValueError(f"history[{i}] is not [day, power_on_hours, attributes]")
        what = f"history[{i}]"
        out.append(reading(_number(entry[0], what), _number(entry[1], what), entry[2], what))
    out.append(reading(day, hours, attrs, "reading"))
    days = np.array([o.day for o in out])
    if np.any(np.diff(days) <= 0):
        raise ValueError("readings are not in day order")
    return out
