"""Platt scaling: margin -> probability, fitted on drive-times sampled like a live fleet.

A logistic map keeps the order of the margins (so ranking metrics are unchanged) and moves
the trees' log-odds, learned on a deliberately rich share of failures, to the real base rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit


@dataclass(frozen=True)
class Platt:
    """P(fail within the horizon) = expit(slope * margin + intercept)."""

    slope: float
    intercept: float

    def __call__(self, margin: np.ndarray) -> np.ndarray:
        return expit(self.slope * np.asarray(margin) + self.intercept)

    @classmethod
    def fit(cls, margin: np.ndarray, label: np.ndarray) -> Platt:
        """Maximum likelihood on (margin, 0/1 label); needs both outcomes present."""
        y = np.asarray(label, dtype=np.float64)
        if y.min() == y.max():
            raise ValueError("calibration needs both failures and survivors")
        m = np.asarray(margin, dtype=np.float64)

        def loss(p: np.ndarray) -> tuple[float, np.ndarray]:
            z = p[0] * m + p[1]
            nll = -(y * log_expit(z) + (1 - y) * log_expit(-z)).mean()
            r = expit(z) - y
            return float(nll), np.array([(r * m).mean(), r.mean()])

        base = np.log(y.mean() / (1 - y.mean()))
        best = minimize(loss, np.array([1.0, base - m.mean()]), jac=True, method="BFGS")
        return cls(slope=float(best.x[0]), intercept=float(best.x[1]))

    def to_json(self) -> dict[str, Any]:
        return {"method": "platt", "slope": self.slope, "intercept": self.intercept}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Platt:
        if doc.get("method") != "platt":
            raise ValueError(f"unknown calibration method {doc.get('method')!r}")
        return cls(slope=float(doc["slope"]), intercept=float(doc["intercept"]))
