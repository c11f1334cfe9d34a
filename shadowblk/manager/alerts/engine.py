"""The alert engine: which alerts start firing and which resolve at each evaluation.

An alert is identified by its name and labels: while it keeps holding it is one alert, sent
once when it starts and once when it resolves (with its resolve message), never per round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shadowblk.manager.alerts.rules import STATELESS_RULES, Alert, ChecksumDiscrepancies, Thresholds
from shadowblk.manager.dashboard.view import FleetView

Rule = Callable[[FleetView, Thresholds], list[Alert]]


@dataclass
class Notification:
    """An alert that started firing (`ends_at` None) or resolved."""

    alert: Alert
    starts_at: float
    ends_at: float | None = None

    @property
    def status(self) -> str:
        return "firing" if self.ends_at is None else "resolved"


@dataclass
class AlertEngine:
    """Evaluates the rules over successive views and remembers what is firing."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    rules: tuple[Rule, ...] = field(
        default_factory=lambda: (*STATELESS_RULES, ChecksumDiscrepancies())
    )
    firing: dict[tuple, Notification] = field(default_factory=dict)

    def evaluate(self, view: FleetView) -> list[Notification]:
        """The notifications VIEW causes: new alerts firing, then alerts resolved."""
        now = {a.key: a for rule in self.rules for a in rule(view, self.thresholds)}
        changes = []
        for key, alert in now.items():
            if key in self.firing:
                self.firing[key].alert = alert  # the words may change (a lag grows): not news
            else:
                self.firing[key] = Notification(alert, view.at)
                changes.append(self.firing[key])
        for key in [k for k in self.firing if k not in now]:
            gone = self.firing.pop(key)
            changes.append(Notification(gone.alert, gone.starts_at, view.at))
        return changes

    def active(self) -> list[Notification]:
        """What is firing, the most severe first, then the oldest."""
        return sorted(
            self.firing.values(), key=lambda n: (n.alert.severity != "critical", n.starts_at)
        )
