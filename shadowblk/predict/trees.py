"""A boosted tree ensemble held as plain arrays: scored and explained with numpy alone.

Training uses scikit-learn's histogram gradient boosting; its trees are then copied into these
arrays, so a stored model needs neither scikit-learn nor pickle to load and score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

CHUNK = 20_000  # samples scored at a time: bounds memory at CHUNK x trees


@dataclass(frozen=True)
class TreeEnsemble:
    """All trees' nodes in flat arrays; tree k's root is node ``roots[k]``.

    A sample goes left when its feature is <= threshold, or is NaN and ``nan_left``. Leaves
    hold their additive value; ``value`` of an inner node is the count-weighted mean of its
    leaves, which is what per-feature explanations are measured against.
    """

    bias: float
    roots: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    nan_left: np.ndarray
    left: np.ndarray
    right: np.ndarray
    leaf: np.ndarray
    value: np.ndarray

    @property
    def n_trees(self) -> int:
        return len(self.roots)

    def _walk(self, x: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
        """Leaf per (sample, tree) pair, flattened sample-major, and every step taken.

        Only pairs still on an inner node are moved at each step, so the work is the total
        path length, not the deepest tree times every pair. A step is (pairs, nodes, children).
        """
        n_features = x.shape[1]
        flat = x.ravel()
        node = np.tile(self.roots, len(x))
        base = np.repeat(np.arange(len(x)) * n_features, self.n_trees)
        active = np.flatnonzero(~self.leaf[node])
        steps = []
        while active.size:
            at = node[active]
            xv = flat[base[active] + self.feature[at]]
            go_left = np.where(np.isnan(xv), self.nan_left[at], xv <= self.threshold[at])
            child = np.where(go_left, self.left[at], self.right[at])
            steps.append((active, at, child))
            node[active] = child
            active = active[~self.leaf[child]]
        return node, steps

    def margin(self, x: np.ndarray) -> np.ndarray:
        """The raw score (log-odds on the training sample's balance) per sample."""
        out = np.empty(len(x))
        for a in range(0, len(x), CHUNK):
            part = x[a : a + CHUNK]
            leaves, _ = self._walk(part)
            out[a : a + CHUNK] = self.bias + self.value[leaves].reshape(len(part), -1).sum(axis=1)
        return out

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Per sample and feature, how much that feature's splits moved the margin.

        Each split is credited with the change in expected value from node to child; the
        credits plus expected_margin() sum to the margin exactly.
        """
        n_features = x.shape[1]
        out = np.zeros((len(x), n_features))
        for a in range(0, len(x), CHUNK):
            part = x[a : a + CHUNK]
            _, steps = self._walk(part)
            acc = np.zeros(len(part) * n_features)
            for pairs, at, child in steps:
                idx = (pairs // self.n_trees) * n_features + self.feature[at]
                delta = self.value[child] - self.value[at]
                acc += np.bincount(idx, weights=delta, minlength=len(acc))
            out[a : a + CHUNK] = acc.reshape(len(part), n_features)
        return out

    def expected_margin(self) -> float:
        """The margin of an average training sample: the bias plus every root's mean value."""
        return float(self.bias + self.value[self.roots].sum())

    def to_json(self) -> dict[str, Any]:
        return {
            "bias": self.bias,
            "roots": self.roots.tolist(),
            "feature": self.feature.tolist(),
            "threshold": [float(v) for v in self.threshold],
            "nan_left": self.nan_left.astype(int).tolist(),
            "left": self.left.tolist(),
            "right": self.right.tolist(),
            "leaf": self.leaf.astype(int).tolist(),
            "value": [round(float(v), 7) for v in self.value],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], n_features: int) -> TreeEnsemble:
        """Arrays from a stored document, checked so a damaged file cannot index out of range."""
        feature = np.asarray(doc["feature"], dtype=np.int64)
        n = len(feature)
        arrays = {
            "threshold": np.asarray(doc["threshold"], dtype=np.float64),
            "nan_left": np.asarray(doc["nan_left"], dtype=bool),
            "left": np.asarray(doc["left"], dtype=np.int64),
            "right": np.asarray(doc["right"], dtype=np.int64),
            "leaf": np.asarray(doc["leaf"], dtype=bool),
            "value": np.asarray(doc["value"], dtype=np.float64),
        }
        roots = np.asarray(doc["roots"], dtype=np.int64)
        if any(len(v) != n for v in arrays.values()):
            raise ValueError("tree arrays differ in length")
        inner = ~arrays["leaf"]
        for name in ("left", "right"):
            if ((arrays[name][inner] < 0) | (arrays[name][inner] >= n)).any():
                raise ValueError(f"tree {name} child out of range")
        if ((feature[inner] < 0) | (feature[inner] >= n_features)).any():
            raise ValueError("tree split on a feature the model does not list")
        if ((roots < 0) | (roots >= n)).any():
            raise ValueError("tree root out of range")
        return cls(bias=float(doc["bias"]), roots=roots, feature=np.maximum(feature, 0), **arrays)


def fit(
    x: np.ndarray, y: np.ndarray, seed: int, params: dict[str, Any] | None = None
) -> TreeEnsemble:
    """Fit gradient-boosted trees with scikit-learn and copy them into a TreeEnsemble."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    settings = {
        "learning_rate": 0.06,
        "max_iter": 250,
        "max_leaf_nodes": 15,
        "min_samples_leaf": 40,
        "l2_regularization": 1.0,
        "early_stopping": False,
        "random_state": seed,
    } | (params or {})
    # One OpenMP thread: on a shared machine its spinning threads made a fit 8x slower.
    with threadpool_limits(limits=1, user_api="openmp"):
        clf = HistGradientBoostingClassifier(**settings).fit(x, y)
    return export(clf)


def export(clf: Any) -> TreeEnsemble:
    """Copy a fitted binary HistGradientBoostingClassifier's trees into flat arrays."""
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("feature", "threshold", "nan_left", "left", "right", "leaf", "value")
    }
    roots = []
    base = 0
    for (predictor,) in clf._predictors:  # one tree per iteration for a binary classifier
        nodes = predictor.nodes
        if nodes["is_categorical"].any():
            raise ValueError("categorical splits are not supported in the stored model")
        leaf = nodes["is_leaf"].astype(bool)
        roots.append(base)
        parts["feature"].append(np.where(leaf, 0, nodes["feature_idx"]))
        parts["threshold"].append(nodes["num_threshold"])
        parts["nan_left"].append(nodes["missing_go_to_left"].astype(bool))
        parts["left"].append(np.where(leaf, 0, nodes["left"].astype(np.int64) + base))
        parts["right"].append(np.where(leaf, 0, nodes["right"].astype(np.int64) + base))
        parts["leaf"].append(leaf)
        parts["value"].append(_mean_values(nodes, leaf))
        base += len(nodes)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return TreeEnsemble(
        bias=float(np.ravel(clf._baseline_prediction)[0]),
        roots=np.asarray(roots, dtype=np.int64),
        **arrays,
    )


def _mean_values(nodes: np.ndarray, leaf: np.ndarray) -> np.ndarray:
    """Leaf values as trained; inner nodes get the count-weighted mean of their children."""
    value = np.where(leaf, nodes["value"], 0.0).astype(np.float64)
    count = nodes["count"].astype(np.float64)
    for i in sorted(np.flatnonzero(~leaf), key=lambda i: -int(nodes["depth"][i])):
        left, right = int(nodes["left"][i]), int(nodes["right"][i])
        total = count[left] + count[right]
        value[i] = (value[left] * count[left] + value[right] * count[right]) / max(total, 1.0)
    return value
