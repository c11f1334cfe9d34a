"""When a server's risk calls for a planned switchover: above a threshold, for long enough.

One reading above the threshold is not enough (a score can flicker); the risk must stay at
or above the threshold, with enough confidence, for the configured time, with no gap in the
readings longer than allowed. The trigger fires once, then stays latched until the risk
falls below the re-arm level. In dry-run it reports instead of switching over.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Action(enum.Enum):
    NONE = "none"
    SWITCHOVER = "switchover"
    REPORT = "report"  # what a switchover would have been, in dry-run


@dataclass(frozen=True)
class TriggerSettings:
    threshold: float = 0.5
    sustain_seconds: float = 3600.0
    min_confidence: float = 0.5
    rearm_below: float = 0.4  # after firing, the risk must fall below this to arm again
    max_gap_seconds: float = 900.0  # a longer silence between readings restarts the count
    dry_run: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], not {self.threshold!r}")
        if not 0 <= self.rearm_below <= self.threshold:
            raise ValueError("rearm_below must lie between 0 and the threshold")
        if self.sustain_seconds < 0 or self.max_gap_seconds <= 0:
            raise ValueError("sustain_seconds must be >= 0 and max_gap_seconds > 0")


@dataclass(frozen=True)
class Decision:
    action: Action
    above_since: float | None  # when the current run above the threshold began
    latched: bool  # fired and not yet re-armed
    reason: str


class SustainedTrigger:
    """Feed it one server's (time, probability, confidence) readings in time order."""

    def __init__(self, settings: TriggerSettings | None = None) -> None:
        self.settings = settings or TriggerSettings()
        self.above_since: float | None = None
        self.last_time: float | None = None
        self.latched = False

    def update(self, now: float, probability: float, confidence: float) -> Decision:
        s = self.settings
        if not (0 <= probability <= 1 and 0 <= confidence <= 1 and math.isfinite(now)):
            raise ValueError("probability and confidence must be in [0, 1], time finite")
        if self.last_time is not None and now < self.last_time:
            raise ValueError(f"readings must come in time order ({now} < {self.last_time})")
        if self.last_time is not None and now - self.last_time > s.max_gap_seconds:
            self.above_since = None
        self.last_time = now
        if self.latched and probability < s.rearm_below:
            self.latched = False
        qualifies = probability >= s.threshold and confidence >= s.min_confidence
        if not qualifies:
            self.above_since = None
            why = "below threshold" if probability < s.threshold else "confidence too low"
            return self._decide(Action.NONE, why)
        if self.above_since is None:
            self.above_since = now
        held = now - self.above_since
        if self.latched:
            return self._decide(Action.NONE, "already fired; waiting to re-arm")
        if held < s.sustain_seconds:
            return self._decide(Action.NONE, f"above threshold for {held:.0f} s")
        self.latched = True
        action = Action.REPORT if s.dry_run else Action.SWITCHOVER
        return self._decide(action, f"above {s.threshold} for {held:.0f} s")

    def _decide(self, action: Action, reason: str) -> Decision:
        return Decision(action, self.above_since, self.latched, reason)
