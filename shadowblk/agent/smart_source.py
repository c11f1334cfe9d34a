"""Where an agent's SMART report comes from: `smartctl -j` of the real disk, or a recorded
drive replayed as if smartctl reported it (labs, demos, what-if runs).

Either way each disk's report carries its history (predict/readings.py), so the manager's
model sees the disk's past, not only today's counters.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from shadowblk.agent import health
from shadowblk.predict.drives import ATTRIBUTES
from shadowblk.predict.readings import SmartLog
from shadowblk.predict.replay import SmartObservation, replay

SMART_EVERY_S = 600.0


def _today(now: float) -> int:
    return int(now // 86400)


class LiveSmart:
    """`smartctl -j -a` of the disk under the data directory every SMART_EVERY_S, with each
    disk's readings kept for its history (in memory: a restarted agent starts a new one).

    The first reading is taken at once (the registration names the drive models); later ones
    in a thread of their own, since smartctl may take seconds and a heartbeat must not wait."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.logs: dict[str, SmartLog] = {}
        self.report: dict[str, Any] = {}
        self._at: float | None = None
        self._reading = threading.Lock()

    def poll(self, now: float) -> dict[str, Any]:
        if self._at is None:
            self._at = now
            self._read()
        elif now - self._at >= SMART_EVERY_S and not self._reading.locked():
            self._at = now
            threading.Thread(target=self._read, name="smartctl", daemon=True).start()
        return self.report

    def _read(self) -> None:
        with self._reading:
            report = health.smart(self.data_dir)
            for name, dev in report.get("devices", {}).items():
                self._remember(name, dev, _today(time.time()))
            self.report = report

    def _remember(self, name: str, dev: dict[str, Any], today: int) -> None:
        attrs = dev.get("attributes", {})
        values = {a: attrs.get(str(a)) for a in ATTRIBUTES}
        hours = attrs.get("9")
        log = self.logs.setdefault(name, SmartLog())
        log.add(SmartObservation(dev.get("serial", ""), dev.get("model", ""), today,
                                 hours, None, values, False))  # fmt: skip
        history = log.device()
        dev.update(day=today, history=history["history"])


class ReplaySmart:
    """One recorded drive, one recorded day every 1/SPEED seconds from START (a date in the
    series; the readings before it are its history at once), as the only disk of the server.

    After the last recorded day the last reading stays. `replay` in the report says where the
    replay is and how the recording ends, for the person (and the test) watching.
    """

    def __init__(
        self, path: Path, serial: str | None, days_per_second: float, start: str | None = None
    ) -> None:
        if days_per_second <= 0:
            raise ValueError(f"the replay speed must be positive, not {days_per_second}")
        self.series = list(replay(path, serial))
        self.path, self.speed = path, days_per_second
        self.first = 0
        if start is not None:
            day = int(np.datetime64(start, "D").astype(np.int64))
            self.first = next((i for i, o in enumerate(self.series) if o.day >= day), -1)
            if self.first < 0:
                raise ValueError(f"{path}: the drive's record ends before {start}")
        self.log = SmartLog()
        self.shown = 0
        self.started: float | None = None

    def poll(self, now: float) -> dict[str, Any]:
        if self.started is None:
            self.started = now
        at = min(self.first + int((now - self.started) * self.speed), len(self.series) - 1)
        for obs in self.series[self.shown : at + 1]:
            self.log.add(obs)
        self.shown = max(self.shown, at + 1)
        last = self.series[-1]
        device = self.log.device()
        return {
            "status": "ok",
            "devices": {"replay": device},
            "replay": {
                "file": self.path.name,
                "day": at - self.first,
                "days": len(self.series) - self.first,
                "date": device["date"],
                "last_date": last.date,
                "ends_in_failure": last.failure,
                "speed_days_per_second": self.speed,
            },
        }
