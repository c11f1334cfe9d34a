"""The failure predictor in the manager: every heartbeat scored, combined, explained, acted on.

Per server it keeps what one heartbeat cannot carry: the latency spike detector's baseline, the
recent verdicts, the I/O error and checksum discrepancy counters over a window, and the
trigger's clock. The SMART history comes with each heartbeat (predict/readings.py), so only the
last score per disk is cached. The result replaces the heartbeat's `failure` (stored with the
server: `server show`, the dashboard, /metrics, the alerts).

When the trigger fires, the server's primaries are to move before it fails: `drain(server,
reason)` is called (it must not block: this runs on the store thread, inside the heartbeat);
in dry-run, or without a drain, the decision is only recorded as a `failure-preempt` event and
logged. Either way the event says why.

The trigger's clock and the error and checksum counters' windows survive a change of leader:
they are part of the `failure` document stored with the server at every heartbeat (`trigger`:
state, above_since; `counters`; `at`), and a manager that assesses a server whose stored
document is newer than its own memory (a new leader, or this one leading again) takes them
over (`_resume`), so a failover neither resets a sustained count nor repeats a decision. The
SMART history comes with every heartbeat. Only the latency detector's baseline stays in the
leader's memory: a new leader learns it again (its warm-up), without a latency signal meanwhile.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shadowblk.manager.store import Store
from shadowblk.manager.store.model import Event
from shadowblk.predict.combine import CombinerSettings, ServerSignals, combine
from shadowblk.predict.latency import LatencySettings, LatencySpikeDetector
from shadowblk.predict.model import Model
from shadowblk.predict.readings import observations
from shadowblk.predict.replay import score_series
from shadowblk.predict.trigger import Action, Decision, SustainedTrigger, TriggerSettings

log = logging.getLogger(__name__)

Drain = Callable[[str, str], None]
KEPT_CHANGES = 64  # of a counter's window, in the stored document


@dataclass(frozen=True)
class RiskSettings:
    """How the manager turns heartbeats into a verdict (the manager's --preempt-* options)."""

    trigger: TriggerSettings = field(default_factory=TriggerSettings)
    combiner: CombinerSettings = field(default_factory=CombinerSettings)
    latency: LatencySettings = field(default_factory=LatencySettings)
    min_probes: int = 3  # timed volume reads a heartbeat needs for a latency verdict
    recent_s: float = 20.0  # the spike share is over the verdicts of this long
    min_verdicts: int = 5  # fewer recent verdicts: no latency signal
    flag_share: float = 0.5  # this share of recent verdicts spiking flags the server's latency
    window_s: float = 600.0  # I/O errors and checksum discrepancies counted over this long


class Increase:
    """How much a cumulative counter grew over the last WINDOW_S (a drop: a restarted agent,
    whose new count starts a new baseline)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.points: deque[tuple[float, int]] = deque()

    def update(self, now: float, value: int) -> int:
        if self.points and value < self.points[-1][1]:
            self.points.clear()
        self.points.append((now, value))
        while len(self.points) > 1 and self.points[1][0] <= now - self.window_s:
            self.points.popleft()
        return value - self.points[0][1]

    def changes(self) -> list[list[float]]:
        """The window as the first point of each run of equal values (the newest
        KEPT_CHANGES): what `update` needs to go on exactly, small enough to store."""
        kept = [p for i, p in enumerate(self.points) if not i or p[1] != self.points[i - 1][1]]
        return [[t, v] for t, v in kept[-KEPT_CHANGES:]]

    def restore(self, changes: Any) -> None:
        """Continue from CHANGES (`changes()`, maybe another manager's); ignored if malformed."""
        if isinstance(changes, list) and all(
            isinstance(c, list) and len(c) == 2 and _finite(c[0]) and _finite(c[1]) for c in changes
        ):
            self.points = deque((float(t), int(v)) for t, v in changes)


class ServerState:
    """What the predictor remembers about one server between heartbeats."""

    def __init__(self, settings: RiskSettings) -> None:
        self.detector = LatencySpikeDetector(settings.latency)
        self.verdicts: deque[tuple[float, bool, float]] = deque()  # time, spike, z
        self.errors = Increase(settings.window_s)
        self.checksums = Increase(settings.window_s)
        self.trigger = SustainedTrigger(settings.trigger)
        self.disks: dict[str, tuple[Any, dict[str, Any]]] = {}  # name -> (its reading, score)


class RiskMonitor:
    """Scores heartbeats (`assess`, on the store thread) with MODEL (None: SMART unscored)."""

    def __init__(
        self,
        store: Store,
        model: Model | None,
        settings: RiskSettings | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.store, self.model = store, model
        self.settings = settings or RiskSettings()
        self.drain = drain  # Manager.start_drain: from the store thread, without waiting
        self.servers: dict[str, ServerState] = {}

    def assess(
        self, server: str, body: dict[str, Any], now: float, stored: Any = None
    ) -> dict[str, Any]:
        """The `failure` document of SERVER after this heartbeat BODY at time NOW; STORED is
        the document the store holds from the last heartbeat (whichever manager wrote it). A
        predictor fault is logged and reported in the document: it never fails the heartbeat."""
        try:
            return self._assess(server, body, now, stored)
        except Exception as err:
            log.exception("failure prediction for %s", server)
            return {"probability": 0.0, "reasons": [f"predictor error: {err}"], "at": now}

    def _assess(self, server: str, body: dict[str, Any], now: float, stored: Any) -> dict[str, Any]:
        state = self.servers.setdefault(server, ServerState(self.settings))
        self._resume(server, state, stored, now)
        disks, smart_doc = self._smart(state, body.get("smart") or {}, now)
        latency = self._latency(state, body.get("io_window") or {}, now)
        errors = state.errors.update(now, int(body.get("io_errors", 0)))
        checksums = state.checksums.update(now, int(body.get("checksum_discrepancies", 0)))
        signals = ServerSignals(
            disk_probabilities={k: v["probability"] for k, v in disks.items()} or None,
            latency_spike_share=latency.get("spike_share"),
            io_errors=errors if "io_errors" in body else None,
            checksum_discrepancies=checksums if "checksum_discrepancies" in body else None,
        )
        risk = combine(signals, self.settings.combiner)
        doc = risk.to_json()
        doc["reasons"] = [f"{e.signal}: {e.detail}" for e in risk.evidence]
        reported = _reported(body.get("failure"))
        if reported is not None and reported[0] > risk.probability:  # an agent's own predictor
            doc["probability"] = reported[0]
            doc["reasons"] = [f"agent: {r}" for r in reported[1]] + doc["reasons"]
        decision = state.trigger.update(now, doc["probability"], risk.confidence)
        doc["signals"] = {
            "smart": smart_doc,
            "latency": latency,
            "io_errors_in_window": errors,
            "checksum_discrepancies_in_window": checksums,
        }
        doc["trigger"] = self._trigger_doc(decision)
        doc["counters"] = {  # for the next leader (_resume)
            "io_errors": state.errors.changes(),
            "checksum_discrepancies": state.checksums.changes(),
        }
        doc["at"] = now
        if decision.action is not Action.NONE:
            self._act(server, decision, doc)
        return doc

    def _resume(self, server: str, state: ServerState, stored: Any, now: float) -> None:
        """Take over the trigger's clock and the counters' windows from STORED when another
        manager wrote it after this one last judged SERVER. A fired trigger stays fired (no
        second decision), unless it was to drain and primaries are still on the server: the
        leader that fired may have died mid-drain, so it fires again at once and the rest
        moves."""
        trigger = state.trigger
        saved = _saved_trigger(stored, self.settings.trigger)
        if saved is None or (trigger.last_time is not None and saved[0] <= trigger.last_time):
            return
        counters = stored.get("counters") or {}
        state.errors.restore(counters.get("io_errors"))
        state.checksums.restore(counters.get("checksum_discrepancies"))
        at, above_since, fired = saved
        at = min(at, now)  # another manager's clock may run ahead of this one's
        trigger.last_time = at
        trigger.above_since = None if above_since is None else min(above_since, at)
        dry_run = self.settings.trigger.dry_run
        trigger.latched = fired and (dry_run or not self._primaries(server))
        log.info("%s: trigger taken over from the store (%s, above the threshold since %s)",
                 server, "fired" if fired else "armed or pending", above_since)  # fmt: skip

    def _primaries(self, server: str) -> list[str]:
        return sorted(v.name for v in self.store.list_volumes() if v.primary == server)

    def _smart(
        self, state: ServerState, smart: dict[str, Any], now: float
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Each disk's score (cached while its reading is unchanged) and what to show of it."""
        scored: dict[str, dict[str, Any]] = {}
        shown: dict[str, Any] = {"status": smart.get("status", "none"), "disks": {}}
        if "replay" in smart:
            shown["replay"] = smart["replay"]
        devices = smart.get("devices") or {}
        for name, device in devices.items() if isinstance(devices, dict) else ():
            if self.model is None:
                shown["disks"][name] = {"error": "no model: the manager runs without --model"}
                continue
            cached = state.disks.get(name)
            if cached is not None and cached[0] == device:
                score = cached[1]
            else:
                try:
                    score = score_series(self.model, observations(device, int(now // 86400)))
                except ValueError as err:
                    shown["disks"][name] = {"error": f"bad SMART report: {err}"}
                    continue
                state.disks[name] = (device, score)
            scored[name] = score
            shown["disks"][name] = {
                "serial": score["serial"],
                "date": score["date"],
                "probability": round(score["probability"], 4),
                "drivers": score["drivers"],
            }
        return scored, shown

    def _latency(self, state: ServerState, window: dict[str, Any], now: float) -> dict[str, Any]:
        """Judge the heartbeat's timed volume reads at their load; the share of recent spikes."""
        s = self.settings
        doc: dict[str, Any] = {}
        # the fastest of the heartbeat's reads: a busy CPU only adds to some of them, a slow
        # store to all of them
        probes, fastest = window.get("probes", 0), window.get("min_ms", 0.0)
        iops = window.get("iops", 0.0)
        if probes >= s.min_probes and fastest > 0:
            verdict = state.detector.update(fastest, iops)
            doc = {"min_ms": round(fastest, 3), "expected_ms": round(verdict.expected_ms, 3),
                   "z": round(verdict.z, 2), "iops": round(iops, 1)}  # fmt: skip
            if verdict.ready:
                state.verdicts.append((now, verdict.spike, verdict.z))
        while state.verdicts and state.verdicts[0][0] < now - s.recent_s:
            state.verdicts.popleft()
        doc["warming_up"] = len(state.detector.log_latency) < s.latency.warmup
        doc["recent_verdicts"] = len(state.verdicts)
        if len(state.verdicts) >= s.min_verdicts:
            share = sum(v[1] for v in state.verdicts) / len(state.verdicts)
            doc["spike_share"] = round(share, 3)
            doc["flagged"] = share >= s.flag_share
        else:
            doc["flagged"] = False
        return doc

    def _trigger_doc(self, decision: Decision) -> dict[str, Any]:
        t = self.settings.trigger
        state = "fired" if decision.latched else "pending" if decision.above_since else "armed"
        return {
            "state": state,
            "above_since": decision.above_since,
            "reason": decision.reason,
            "threshold": t.threshold,
            "sustain_seconds": t.sustain_seconds,
            "dry_run": t.dry_run,
        }

    def _act(self, server: str, decision: Decision, doc: dict[str, Any]) -> None:
        """Record why the server's primaries are to move; move them unless in dry-run."""
        why = (
            f"predicted failure of {server}: probability {doc['probability']:.2f} "
            f"(confidence {doc['confidence']:.2f}), {decision.reason}: {doc['explanation']}"
        )
        primaries = self._primaries(server)
        detail: dict[str, Any] = {
            "action": "report" if decision.action is Action.REPORT else "drain",
            "dry_run": decision.action is Action.REPORT,
            "probability": doc["probability"],
            "confidence": doc["confidence"],
            "reasons": doc["reasons"],
            "smart": doc["signals"]["smart"],
            "primaries": primaries,
            "reason": why,
        }
        if decision.action is Action.SWITCHOVER:
            if self.drain is None:
                detail["drain"] = "not available in this manager: decision recorded only"
            else:
                try:
                    self.drain(server, why)
                    detail["drain"] = "started"
                except Exception as err:  # the decision stands; say why it could not act
                    log.exception("drain of %s failed", server)
                    detail["drain"] = f"failed: {err}"
        self.store.append_event(Event("failure-preempt", server, detail, at=time.time()))
        log.warning("%s%s; primaries: %s", "dry run: " if detail["dry_run"] else "", why,
                    ", ".join(primaries) or "none")  # fmt: skip


def _reported(failure: Any) -> tuple[float, list[str]] | None:
    """An agent's own failure estimate, if it is one: a finite probability in [0, 1] and text
    reasons. Anything else is ignored, never allowed to drive the trigger."""
    if not isinstance(failure, dict):
        return None
    p, reasons = failure.get("probability"), failure.get("reasons", [])
    if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p):
        return None
    if not 0.0 <= p <= 1.0 or not isinstance(reasons, list):
        return None
    return float(p), [str(r) for r in reasons if isinstance(r, str)]


def _saved_trigger(
    stored: Any, settings: TriggerSettings
) -> tuple[float, float | None, bool] | None:
    """(when, above since, fired) of the trigger in a stored `failure` document, if it was kept
    under the same policy (threshold, sustain time, dry run): a clock counted against another
    threshold, or a decision taken in dry run, is not this manager's to continue."""
    if not isinstance(stored, dict) or not isinstance(stored.get("trigger"), dict):
        return None
    saved, at = stored["trigger"], stored.get("at")
    since = saved.get("above_since")
    policy = (saved.get("threshold"), saved.get("sustain_seconds"), saved.get("dry_run"))
    if policy != (settings.threshold, settings.sustain_seconds, settings.dry_run):
        return None
    if not _finite(at) or saved.get("state") not in ("armed", "pending", "fired"):
        return None
    if since is not None and not _finite(since):
        return None
    return float(at), None if since is None else float(since), saved["state"] == "fired"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
