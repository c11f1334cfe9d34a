"""Scoring drives at their latest record, with the features that pushed each score up."""

from __future__ import annotations

from typing import Any

import numpy as np

from shadowblk.predict.drives import DriveTable
from shadowblk.predict.model import Model


def score_latest(model: Model, table: DriveTable, top: int = 3) -> list[dict[str, Any]]:
    """P(fail within 30 days) per drive at its latest record, highest first.

    ``drivers`` lists the TOP features whose splits raised the drive's score the most (log-odds
    contribution against an average training drive), with the drive's value of each.
    """
    drive = np.arange(len(table))
    x = model.history(table).features(drive, table.end_hour)
    prob = model.probability(x)
    contrib = model.trees.contributions(x)
    day = table.day_at(drive, table.end_hour).astype(np.int64).astype("datetime64[D]")
    out = []
    for d in np.argsort(-prob, kind="stable"):
        best = np.argsort(-contrib[d], kind="stable")[:top]
        drivers = [
            {
                "feature": model.features[j],
                "value": None if np.isnan(x[d, j]) else float(x[d, j]),
                "contribution": round(float(contrib[d, j]), 4),
            }
            for j in best
            if contrib[d, j] > 0
        ]
        out.append(
            {
                "serial": str(table.serial[d]),
                "model": str(table.model[d]),
                "date": str(day[d]),
                "power_on_hours": float(table.end_hour[d]),
                "probability": float(prob[d]),
                "drivers": drivers,
            }
        )
    return out
