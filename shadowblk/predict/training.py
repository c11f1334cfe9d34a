"""`predict train`: from SMART history to a calibrated, stored model, reproducibly from a seed.

The drives are split by a hash of their serial: a held-out share the model never sees (for
`evaluate`), and within the rest a calibration share, so the probability map is fitted on
drives the trees did not learn from.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shadowblk.predict import trees
from shadowblk.predict.calibration import Platt
from shadowblk.predict.drives import DriveTable
from shadowblk.predict.features import RATE_FOLDS, FleetRates, History, feature_names
from shadowblk.predict.model import Model
from shadowblk.predict.sampling import fleet_points, held_out, training_points

CALIBRATION_FRACTION = 0.2


def holdout_salt(seed: int) -> str:
    return f"holdout-{seed}"


def rates_salt(seed: int) -> str:
    return f"rates-{seed}"


def train(
    table: DriveTable,
    seed: int = 0,
    holdout: float = 0.25,
    sources: list[str] | None = None,
    tree_params: dict[str, Any] | None = None,
    sampling: dict[str, Any] | None = None,
) -> Model:
    """Fit trees on most training drives and Platt scaling on the others."""
    test = held_out(table.serial, holdout, holdout_salt(seed))
    train_table = table.subset(~test)
    calib = held_out(train_table.serial, CALIBRATION_FRACTION, f"calibration-{seed}")
    fit_table, cal_table = train_table.subset(~calib), train_table.subset(calib)
    if fit_table.n_failed < 10 or cal_table.n_failed < 2:
        raise ValueError(
            f"too few failed drives to train on ({train_table.n_failed} outside the held-out "
            "share); give more data or a smaller --holdout"
        )
    rates = FleetRates.fit(fit_table)
    # The trees learn from out-of-fold rates: a drive's own failure never enters its rates.
    out_of_fold = FleetRates.out_of_fold(fit_table, rates_salt(seed))
    rng = np.random.default_rng(seed)
    points = training_points(fit_table, rng, **(sampling or {}))
    x = History(fit_table, rates, out_of_fold).features(points.drive, points.hour)
    ensemble = trees.fit(x, points.label, seed, tree_params)
    cal_points = fleet_points(cal_table, rng)
    cal_x = History(cal_table, rates).features(cal_points.drive, cal_points.hour)
    platt = Platt.fit(ensemble.margin(cal_x), cal_points.label)
    info = {
        "seed": seed,
        "sources": sources or [],
        "holdout": {"fraction": holdout, "salt": holdout_salt(seed)},
        "drives": {
            "fit": len(fit_table),
            "calibration": len(cal_table),
            "held_out": int(test.sum()),
        },
        "failed_drives": {"fit": fit_table.n_failed, "calibration": cal_table.n_failed},
        "samples": {
            "fit": len(points),
            "fit_positive": int(points.label.sum()),
            "calibration": len(cal_points),
            "calibration_positive": int(cal_points.label.sum()),
        },
        "trees": ensemble.n_trees,
        "rates": {"out_of_fold": RATE_FOLDS, "salt": rates_salt(seed)},
    }
    return Model(ensemble, platt, rates, feature_names(), info)
