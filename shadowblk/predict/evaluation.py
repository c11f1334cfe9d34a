"""The issue's evaluation protocol for a trained model, with Backblaze's rule alongside.

Per lead time L: AUC, recall at 0.1% and 1% false-positive rate, the rule's own recall and
false-positive rate, and the model's recall at the rule's false-positive rate. Calibration
(Brier score, reliability table) is measured on drive-times sampled like a live fleet, where
a 30-day failure probability is what the model claims to output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shadowblk.predict import metrics
from shadowblk.predict.drives import DriveTable
from shadowblk.predict.model import Model
from shadowblk.predict.sampling import fleet_points, held_out, protocol_points

LEADS_DAYS = (1, 7, 14, 30)
FPRS = (0.001, 0.01)


def rule_flag(features: np.ndarray, names: list[str]) -> np.ndarray:
    """Backblaze's rule from the feature matrix: raw SMART 5, 187, 188, 197 or 198 above 0."""
    return features[:, names.index("rule_flag")] > 0


def unseen_drives(model: Model, table: DriveTable) -> np.ndarray:
    """Mask of the drives in TABLE that the model's training held out (all, if none was)."""
    split = model.info.get("holdout") or {}
    if not split.get("fraction"):
        return np.ones(len(table), dtype=bool)
    return held_out(table.serial, float(split["fraction"]), str(split["salt"]))


def evaluate(
    model: Model, table: DriveTable, seed: int = 0, since_day: float | None = None
) -> dict[str, Any]:
    """Every metric of the protocol on TABLE (already restricted to drives to judge on)."""
    history = model.history(table)
    rng = np.random.default_rng(seed)
    leads = []
    for lead in LEADS_DAYS:
        pts = protocol_points(table, lead, rng, since_day)
        if pts.label.min(initial=1) == pts.label.max(initial=0):
            raise ValueError(f"no failures or no healthy drives to evaluate at L = {lead} days")
        x = history.features(pts.drive, pts.hour)
        margin = model.margin(x)
        rule = metrics.rates(rule_flag(x, model.features), pts.label)
        at_rule = metrics.recall_at_fpr(margin, pts.label, rule["fpr"])
        leads.append(
            {
                "lead_days": lead,
                "positives": int(pts.label.sum()),
                "negatives": int(len(pts) - pts.label.sum()),
                "auc": metrics.auc(margin, pts.label),
                "at_fpr": {
                    str(f): metrics.recall_at_fpr(margin, pts.label, f)["recall"] for f in FPRS
                },
                "rule": rule | {"auc": metrics.auc(rule_flag(x, model.features), pts.label)},
                "recall_at_rule_fpr": at_rule["recall"],
                "recall_vs_rule": at_rule["recall"] / rule["recall"] if rule["recall"] else None,
            }
        )
    fleet = fleet_points(table, rng, since_day=since_day)
    prob = model.probability(history.features(fleet.drive, fleet.hour))
    base = float(fleet.label.mean())
    return {
        "drives": len(table),
        "failed_drives": table.n_failed,
        "leads": leads,
        "calibration": {
            "samples": len(fleet),
            "failures_within_30d": int(fleet.label.sum()),
            "brier": metrics.brier(prob, fleet.label),
            "brier_base_rate": metrics.brier(np.full(len(prob), base), fleet.label),
            "reliability": metrics.reliability(prob, fleet.label),
        },
    }
