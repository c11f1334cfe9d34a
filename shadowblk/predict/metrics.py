"""Scores of a predictor against outcomes: ranking (AUC, recall at a false-positive rate) and
calibration (Brier score, reliability table)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

#: Upper edges of the reliability table's bins of predicted probability.
RELIABILITY_EDGES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half)."""
    label = np.asarray(label, dtype=bool)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recall_at_fpr(score: np.ndarray, label: np.ndarray, fpr: float) -> dict[str, float]:
    """Recall at the strictest threshold whose false-positive rate does not exceed FPR.

    A drive is flagged when its score is strictly above the threshold, so ties at the
    threshold never push the false-positive rate past FPR.
    """
    label = np.asarray(label, dtype=bool)
    neg = np.sort(np.asarray(score)[~label])
    allowed = int(np.floor(fpr * len(neg)))
    threshold = neg[len(neg) - allowed - 1] if allowed < len(neg) else -np.inf
    flagged = np.asarray(score) > threshold
    return {
        "recall": float(flagged[label].mean()),
        "fpr": float(flagged[~label].mean()),
        "threshold": float(threshold),
    }


def rates(flag: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Recall and false-positive rate of a yes/no predictor."""
    label = np.asarray(label, dtype=bool)
    return {"recall": float(flag[label].mean()), "fpr": float(flag[~label].mean())}


def brier(prob: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean((np.asarray(prob) - np.asarray(label)) ** 2))


def reliability(prob: np.ndarray, label: np.ndarray) -> list[dict[str, Any]]:
    """Per bin of predicted probability: how many, mean prediction, observed failure share."""
    prob = np.asarray(prob)
    label = np.asarray(label, dtype=float)
    bins = np.searchsorted(np.asarray(RELIABILITY_EDGES), prob, side="left")
    table = []
    lower = 0.0
    for i, upper in enumerate(RELIABILITY_EDGES):
        inside = bins == i
        n = int(inside.sum())
        table.append(
            {
                "bin": [lower, upper],
                "count": n,
                "failures": int(label[inside].sum()),
                "mean_predicted": float(prob[inside].mean()) if n else None,
                "observed": float(label[inside].mean()) if n else None,
            }
        )
        lower = upper
    return table
