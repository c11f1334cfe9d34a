"""Latency spikes against a server's own baseline, without alarming on load changes alone.

Latency rises with load on a healthy device too, so a sample is compared with what the same
server showed at the same load or more: the median latency of the baseline samples nearest
in load among those at similar or higher load. Above every load seen, latency is allowed to
grow at least in proportion to load (the saturated-queue worst case). The distance above that
expectation is measured in robust z units (MAD of the baseline's own residuals). Slow samples
stay out of the baseline, so a failing disk does not teach the detector that slowness is
normal; a change of load is learned as soon as its samples enter the baseline.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class LatencySettings:
    """Tuning of the detector; the defaults suit one sample per server every 10-60 s."""

    window: int = 240  # healthy samples kept as the baseline
    warmup: int = 30  # samples before any verdict
    threshold: float = 6.0  # robust z above which a sample is a spike
    neighbours: int = 15  # baseline samples that set the expectation at a load
    similar_load: float = 0.25  # log-load distance counted as "the same load" (about 28%)
    growth_slope: float = 1.0  # d log latency / d log load assumed above every load seen
    refit_every: int = 10  # samples between re-estimates of the residual scale
    min_scale: float = 0.05  # floor of the residual scale (log units, about 5%)


@dataclass(frozen=True)
class LatencyVerdict:
    """One sample judged: its expected latency at this load and how far above it lies."""

    latency_ms: float
    expected_ms: float
    z: float
    spike: bool
    ready: bool  # False during warm-up: no verdict yet


class LatencySpikeDetector:
    """One per server: feed (latency, load) samples in time order, read a verdict per sample."""

    def __init__(self, settings: LatencySettings | None = None) -> None:
        self.settings = settings or LatencySettings()
        self.log_load: deque[float] = deque(maxlen=self.settings.window)
        self.log_latency: deque[float] = deque(maxlen=self.settings.window)
        self.since_fit = 0
        self.scale: float | None = None

    def update(self, latency_ms: float, load_iops: float) -> LatencyVerdict:
        """Judge one sample (a latency percentile in ms and the I/O rate it was measured at)."""
        if not (latency_ms > 0 and math.isfinite(latency_ms)):
            raise ValueError(f"latency must be a positive number of ms, not {latency_ms!r}")
        if not (load_iops >= 0 and math.isfinite(load_iops)):
            raise ValueError(f"load must be a non-negative I/O rate, not {load_iops!r}")
        x, y = math.log1p(load_iops), math.log(latency_ms)
        if len(self.log_latency) < self.settings.warmup:
            self._remember(x, y)
            return LatencyVerdict(latency_ms, latency_ms, 0.0, False, False)
        loads = np.fromiter(self.log_load, dtype=float)
        lats = np.fromiter(self.log_latency, dtype=float)
        if self.scale is None or self.since_fit >= self.settings.refit_every:
            self.scale = self._residual_scale(loads, lats)
            self.since_fit = 0
        expected = self._expected(loads, lats, x)
        z = (y - expected) / self.scale
        spike = z > self.settings.threshold
        if not spike:
            self._remember(x, y)
        return LatencyVerdict(latency_ms, math.exp(expected), z, spike, True)

    def _remember(self, x: float, y: float) -> None:
        self.log_load.append(x)
        self.log_latency.append(y)
        self.since_fit += 1

    def _expected(self, loads: np.ndarray, lats: np.ndarray, x: float) -> float:
        """Expected log latency at log load X: what the baseline showed at this load or more."""
        s = self.settings
        top = loads.max()
        if x > top + s.similar_load:
            near = np.argsort(-loads)[: s.neighbours]
            reach = x - float(np.median(loads[near]))
            return float(np.median(lats[near])) + s.growth_slope * reach
        candidates = np.flatnonzero(loads >= x - s.similar_load)
        near = candidates[np.argsort(np.abs(loads[candidates] - x))[: s.neighbours]]
        return float(np.median(lats[near]))

    def _residual_scale(self, loads: np.ndarray, lats: np.ndarray) -> float:
        """Robust spread of the baseline around its own expectations (log units)."""
        s = self.settings
        distance = np.abs(loads[None, :] - loads[:, None])
        distance[loads[None, :] < loads[:, None] - s.similar_load] = np.inf
        k = min(s.neighbours, len(loads))
        near = np.argpartition(distance, k - 1, axis=1)[:, :k]
        resid = lats - np.median(lats[near], axis=1)
        mad = float(np.median(np.abs(resid - np.median(resid))))
        return max(MAD_TO_SIGMA * mad, self.settings.min_scale)
