"""One failure probability per server from the SMART model and the live signals, explained.

The SMART model gives each disk P(fail within 30 days); the server's SMART risk is that any
of its disks fails. Latency spikes, I/O errors and checksum discrepancies then shift the odds
by configured likelihood ratios (naive Bayes in log-odds): there is no labelled history for
these signals yet, so their weights are settings an operator can read and change, not learned
values. Confidence says how much of the evidence was actually there and fresh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CombinerSettings:
    """Evidence weights. A signal at or beyond its `full` level multiplies the odds by its LR."""

    prior: float = 0.005  # P(server fails within 30 days) when no SMART score is available
    smart_max_age_hours: float = 48.0  # older SMART scores count as missing
    latency_lr: float = 5.0
    latency_full_share: float = 0.2  # share of recent latency samples that were spikes
    error_lr: float = 10.0
    error_full: int = 10  # I/O errors in the window
    checksum_lr: float = 20.0
    checksum_full: int = 3  # checksum discrepancies in the window
    #: How much each signal counts towards confidence (they sum to 1).
    weights: Mapping[str, float] = field(
        default_factory=lambda: {"smart": 0.55, "latency": 0.2, "errors": 0.1, "checksums": 0.15}
    )


@dataclass(frozen=True)
class ServerSignals:
    """What the manager knows about one server now; None means the signal is not available."""

    disk_probabilities: Mapping[str, float] | None = None  # disk -> SMART model probability
    smart_age_hours: float | None = None
    latency_spike_share: float | None = None
    io_errors: int | None = None
    checksum_discrepancies: int | None = None


@dataclass(frozen=True)
class Evidence:
    signal: str
    detail: str
    log_odds: float  # how far this signal moved the server's log-odds


@dataclass(frozen=True)
class ServerRisk:
    """The combined verdict: probability, confidence in [0, 1] with a level, and why."""

    probability: float
    confidence: float
    level: str  # low, medium, high
    evidence: list[Evidence]

    def explanation(self) -> str:
        parts = [f"{e.signal}: {e.detail} ({e.log_odds:+.2f} log-odds)" for e in self.evidence]
        return "; ".join(parts) if parts else "no evidence"

    def to_json(self) -> dict[str, Any]:
        return {
            "probability": self.probability,
            "confidence": self.confidence,
            "level": self.level,
            "explanation": self.explanation(),
            "evidence": [e.__dict__ for e in self.evidence],
        }


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


def _check_probability(name: str, p: float) -> None:
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], not {p!r}")


def combine(signals: ServerSignals, settings: CombinerSettings | None = None) -> ServerRisk:
    """The server's P(failure within 30 days), its confidence and the evidence behind it."""
    s = settings or CombinerSettings()
    evidence: list[Evidence] = []
    present: set[str] = set()
    disks = signals.disk_probabilities
    fresh = signals.smart_age_hours is None or signals.smart_age_hours <= s.smart_max_age_hours
    if disks and fresh:
        for name, p in disks.items():
            _check_probability(f"disk {name}", p)
        survive = math.prod(1 - p for p in disks.values())
        base = 1 - survive
        worst = max(disks, key=lambda k: disks[k])
        detail = f"P(any of {len(disks)} disks fails in 30 d) = {base:.3f}, worst {worst}"
        evidence.append(Evidence("smart", f"{detail} ({disks[worst]:.3f})", 0.0))
        present.add("smart")
    else:
        base = s.prior
        why = "stale" if disks else "missing"
        evidence.append(Evidence("smart", f"{why}: fleet prior {s.prior:.3f} used", 0.0))
    log_odds = _logit(base)
    graded = (
        ("latency", signals.latency_spike_share, s.latency_full_share, s.latency_lr, "spike share"),
        ("errors", signals.io_errors, s.error_full, s.error_lr, "I/O errors"),
        ("checksums", signals.checksum_discrepancies, s.checksum_full, s.checksum_lr, "mismatches"),
    )
    for name, level, full, lr, what in graded:
        if level is None:
            continue
        if level < 0:
            raise ValueError(f"{name} signal must not be negative, got {level!r}")
        present.add(name)
        shift = min(level / full, 1.0) * math.log(lr)
        log_odds += shift
        if shift > 0:
            evidence.append(Evidence(name, f"{what} {level:g} (full weight at {full:g})", shift))
    probability = 1 / (1 + math.exp(-log_odds))
    confidence = round(sum(w for k, w in s.weights.items() if k in present), 6)
    level = "high" if confidence >= 0.8 else "medium" if confidence >= 0.5 else "low"
    evidence.sort(key=lambda e: -e.log_odds)
    return ServerRisk(probability, confidence, level, evidence)
