"""The alert rules: what is wrong in a FleetView, each finding with its severity and words.

A rule returns the alerts that hold now; the engine turns "holds now / held before" into
firing and resolved notifications. An alert's identity is its name and labels, so the same
problem seen twice is one alert (deduplication), and its resolve message is written with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shadowblk.manager.dashboard.view import FleetView
from shadowblk.manager.store.model import ServerState, ShadowState


@dataclass(frozen=True)
class Thresholds:
    """Where the rules draw the line; the manager reads them from its alerts config."""

    lag_seconds: float = 30.0
    lag_bytes: int = 1 << 30
    failure_probability: float = 0.5
    discrepancy_window_s: float = 600.0


@dataclass(frozen=True)
class Alert:
    """One problem that holds now."""

    name: str
    labels: tuple[tuple[str, str], ...]  # sorted (key, value) pairs without `alertname`
    severity: str  # critical | warning
    summary: str
    resolved: str  # what the resolve notification says
    description: str = ""

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return self.name, self.labels


def _alert(
    name: str, severity: str, summary: str, resolved: str, desc: str = "", **labels: str
) -> Alert:
    return Alert(name, tuple(sorted(labels.items())), severity, summary, resolved, desc)


def server_down(view: FleetView, th: Thresholds) -> list[Alert]:
    return [
        _alert(
            "ServerDown",
            "critical",
            f"server {s.name} is down: no heartbeat for {view.at - s.last_heartbeat:.0f} s",
            f"server {s.name} is up again",
            server=s.name,
        )
        for s in view.servers
        if s.state is ServerState.DOWN
    ]


def shadow_out_of_sync(view: FleetView, th: Thresholds) -> list[Alert]:
    """A shadow that cannot be switched to now: its server is down, the store marks it stale,
    or the primary reports it stale or disconnected."""
    found = []
    for v in view.volumes:
        reported = view.volume_health(v).get("shadows", {})
        for shadow in v.shadows:
            state = reported.get(shadow.server, {}).get("state")
            if not view.up(shadow.server):
                why = f"its server {shadow.server} is down"
            elif shadow.state is ShadowState.STALE:
                why = "the manager marks it stale"
            elif state in ("stale", "disconnected"):
                why = f"the primary {v.primary} reports it {state}"
            else:
                continue
            found.append(
                _alert(
                    "ShadowOutOfSync",
                    "warning",
                    f"shadow of {v.name} on {shadow.server} is out of sync: {why}",
                    f"shadow of {v.name} on {shadow.server} is back in service",
                    volume=v.name,
                    shadow=shadow.server,
                )
            )
    return found


def replication_lag(view: FleetView, th: Thresholds) -> list[Alert]:
    found = []
    for v in view.volumes:
        for shadow, s in view.volume_health(v).get("shadows", {}).items():
            lag_s, lag_b = s.get("lag_seconds", 0.0), s.get("lag_bytes", 0)
            if lag_s > th.lag_seconds or lag_b > th.lag_bytes:
                found.append(
                    _alert(
                        "ReplicationLagHigh",
                        "warning",
                        f"shadow of {v.name} on {shadow} lags {lag_s:.1f} s / {lag_b} bytes "
                        f"(limits {th.lag_seconds:g} s / {th.lag_bytes} bytes)",
                        f"shadow of {v.name} on {shadow} has caught up",
                        volume=v.name,
                        shadow=shadow,
                    )
                )
    return found


def failure_probability(view: FleetView, th: Thresholds) -> list[Alert]:
    found = []
    for s in view.servers:
        if s.failure_probability > th.failure_probability:
            reasons = (s.health.get("failure") or {}).get("reasons") or ["no reason given"]
            found.append(
                _alert(
                    "FailureProbabilityHigh",
                    "warning",
                    f"server {s.name} may fail soon: probability {s.failure_probability:.2f} "
                    f"over {th.failure_probability:g}",
                    f"server {s.name}'s failure probability is below {th.failure_probability:g}",
                    "; ".join(reasons),
                    server=s.name,
                )
            )
    return found


def switchover_failed(view: FleetView, th: Thresholds) -> list[Alert]:
    """A volume whose latest switchover failed, until one succeeds."""
    found = []
    for v in view.volumes:
        last = view.last_switchover_result(v.name)
        if last is not None and last.detail.get("outcome") == "failed":
            found.append(
                _alert(
                    "SwitchoverFailed",
                    "critical",
                    f"switchover of {v.name} from {last.detail.get('from', '?')} to "
                    f"{last.detail.get('to', '?')} failed",
                    f"a later switchover of {v.name} succeeded",
                    last.detail.get("reason", ""),
                    volume=v.name,
                )
            )
    return found


@dataclass
class ChecksumDiscrepancies:
    """Fires for a server whose discrepancy counter grew in the last window. The counter is
    cumulative, so the rule keeps each server's last value and when it last grew; a manager
    that starts takes the counters it first sees as its baseline."""

    seen: dict[str, int] = field(default_factory=dict)
    grew_at: dict[str, tuple[float, int]] = field(default_factory=dict)  # time, increase

    def __call__(self, view: FleetView, th: Thresholds) -> list[Alert]:
        found = []
        for s in view.servers:
            count = s.health.get("checksum_discrepancies", 0)
            before = self.seen.get(s.name, count)
            if count > before:
                self.grew_at[s.name] = (view.at, count - before)
            self.seen[s.name] = count
            when, increase = self.grew_at.get(s.name, (None, 0))
            if when is not None and view.at - when < th.discrepancy_window_s:
                found.append(
                    _alert(
                        "ChecksumDiscrepancy",
                        "warning",
                        f"server {s.name}: {increase} block(s) differed between a primary and "
                        f"a shadow",
                        f"no new checksum discrepancy on {s.name} for "
                        f"{th.discrepancy_window_s:g} s",
                        server=s.name,
                    )
                )
        return found


STATELESS_RULES = (
    server_down,
    shadow_out_of_sync,
    replication_lag,
    failure_probability,
    switchover_failed,
)
