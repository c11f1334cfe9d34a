"""The stored model: trees equal scikit-learn's, explanations add up, files are checked."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from shadowblk.predict import metrics
from shadowblk.predict.calibration import Platt
from shadowblk.predict.features import FleetRates, feature_names
from shadowblk.predict.model import FORMAT_VERSION, Model, ModelFileError
from shadowblk.predict.trees import TreeEnsemble, export


@pytest.fixture(scope="module")
def fitted() -> tuple[HistGradientBoostingClassifier, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, len(feature_names())))
    x[rng.random(x.shape) < 0.15] = np.nan
    y = np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 3]) * 2 + rng.normal(size=len(x)) > 1.5
    clf = HistGradientBoostingClassifier(max_iter=40, max_leaf_nodes=15, random_state=0)
    return clf.fit(x, y.astype(int)), x


def test_exported_trees_score_like_scikit_learn(fitted) -> None:
    clf, x = fitted
    trees = export(clf)
    np.testing.assert_allclose(trees.margin(x), clf.decision_function(x), atol=1e-9)


def test_contributions_sum_to_the_margin(fitted) -> None:
    clf, x = fitted
    trees = export(clf)
    contrib = trees.contributions(x[:200])
    np.testing.assert_allclose(
        contrib.sum(axis=1) + trees.expected_margin(), trees.margin(x[:200]), atol=1e-9
    )
    # the two informative features carry most of the credit
    top = np.abs(contrib).mean(axis=0).argsort()[-2:]
    assert set(top) == {0, 3}


def test_platt_recovers_a_known_map() -> None:
    rng = np.random.default_rng(3)
    margin = rng.normal(size=50_000) * 2
    label = rng.random(len(margin)) < Platt(0.7, -3.0)(margin)
    fit = Platt.fit(margin, label)
    assert fit.slope == pytest.approx(0.7, abs=0.05)
    assert fit.intercept == pytest.approx(-3.0, abs=0.1)
    with pytest.raises(ValueError, match="both"):
        Platt.fit(margin, np.zeros(len(margin)))


def model_of(clf) -> Model:
    rates = FleetRates(fleet=0.02, model={"M": 0.03}, maker={"ST": 0.025})
    return Model(export(clf), Platt(1.0, -2.0), rates, feature_names(), {"seed": 0})


def test_model_file_round_trip_is_small_and_exact(fitted, tmp_path: Path) -> None:
    clf, x = fitted
    model = model_of(clf)
    for name in ("m.json", "m.json.gz"):
        model.save(tmp_path / name)
        back = Model.load(tmp_path / name)
        np.testing.assert_allclose(back.probability(x), model.probability(x), rtol=1e-6)
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["format_version"] == FORMAT_VERSION
    assert doc["features"] == feature_names()


def test_unknown_format_version_is_refused(fitted, tmp_path: Path) -> None:
    doc = model_of(fitted[0]).to_json() | {"format_version": FORMAT_VERSION + 1}
    path = tmp_path / "future.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match=r"format_version 2 is not supported.*retrain"):
        Model.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x80\x04pickle", "not a JSON model file"),
        (json.dumps({"hello": 1}).encode(), "not a shadowblk SMART model"),
        (gzip.compress(b"{"), "not a JSON model file"),
    ],
)
def test_other_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.model"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        Model.load(path)


def test_damaged_trees_are_refused(fitted, tmp_path: Path) -> None:
    doc = model_of(fitted[0]).to_json()
    doc["trees"]["left"][0] = 10**9
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="damaged model file: tree left child out of range"):
        Model.load(path)
    with pytest.raises(ValueError, match="differ in length"):
        TreeEnsemble.from_json(doc["trees"] | {"value": [0.0]}, 3)


def test_metrics_on_known_cases() -> None:
    label = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    score = np.array([0.9, 0.2, 0.95, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert metrics.auc(score, label) == pytest.approx((7 + 7) / 16)
    at = metrics.recall_at_fpr(score, label, 0.125)  # one negative of eight may be flagged
    assert at["recall"] == 1.0 and at["fpr"] == 0.125 and at["threshold"] == 0.1
    assert metrics.recall_at_fpr(score, label, 0.0)["recall"] == 0.0  # 0.95 is a negative
    # ties at the threshold are never flagged, so the rate allowed is never exceeded
    assert metrics.recall_at_fpr(score, label, 0.5)["fpr"] == 0.125
    assert metrics.brier(np.array([1.0, 0.0]), np.array([1, 1])) == 0.5
    table = metrics.reliability(np.array([0.001, 0.003, 0.7]), np.array([0, 1, 1]))
    assert table[0]["count"] == 2 and table[0]["observed"] == 0.5
    assert table[-1]["count"] == 1 and table[-1]["mean_predicted"] == 0.7
