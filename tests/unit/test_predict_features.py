"""Features at time t use only what was known at t; sampling follows the issue's protocol."""

import dataclasses

import numpy as np
import pytest

from shadowblk.predict.drives import ATTRIBUTES, DriveTable
from shadowblk.predict.features import FleetRates, History, feature_names
from shadowblk.predict.sampling import fleet_points, held_out, protocol_points, training_points

A5 = ATTRIBUTES.index(5)


def table_of(hours: list[list[float]], smart5: list[list[float]], failed: list[bool]) -> DriveTable:
    """Drives with the given change hours and smart_5 values (other attributes zero)."""
    counts = [len(h) for h in hours]
    values = np.zeros((sum(counts), len(ATTRIBUTES)))
    values[:, A5] = np.concatenate(smart5)
    n = len(hours)
    return DriveTable(
        serial=np.array([f"S{i}" for i in range(n)]),
        model=np.array(["ST4000DM000"] * n),
        maker=np.array(["ST"] * n),
        capacity_tb=np.full(n, 4.0),
        start_hour=np.array([h[0] for h in hours], dtype=float),
        end_hour=np.array([h[-1] + 2000 for h in hours], dtype=float),
        start_day=np.full(n, 16000.0),
        failed=np.array(failed),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        obs_hour=np.concatenate(hours).astype(float),
        obs_values=values,
    )


def feature(table: DriveTable, drive: int, hour: float, name: str) -> float:
    history = History(table, FleetRates.fit(table))
    return float(
        history.features(np.array([drive]), np.array([hour]))[0, feature_names().index(name)]
    )


def test_history_of_one_attribute() -> None:
    table = table_of([[0, 100, 500, 900], [0]], [[0, 3, 1, 6], [0]], [True, False])
    assert feature(table, 0, 50, "smart_5") == 0
    assert feature(table, 0, 600, "smart_5") == 1
    assert feature(table, 0, 600, "smart_5_max") == 3
    assert feature(table, 0, 600, "smart_5_increases") == 1
    assert feature(table, 0, 1000, "smart_5_increases") == 2
    assert feature(table, 0, 600, "smart_5_hours_since_nonzero") == 500
    assert feature(table, 0, 1000, "smart_5_hours_since_increase") == 100
    assert np.isnan(feature(table, 0, 50, "smart_5_hours_since_nonzero"))
    assert feature(table, 0, 1000, "smart_5_change_30d") == 3  # 3 at hour 280 -> 6 at 1000
    assert feature(table, 0, 1000, "smart_5_change_7d") == 5  # 1 at hour 832 -> 6 at 1000
    assert feature(table, 0, 1000, "smart_5_increases_30d") == 1  # the rise at hour 900
    assert feature(table, 0, 1000, "rule_increases_7d") == 1
    assert feature(table, 0, 1000, "rule_flag") == 1
    assert feature(table, 0, 50, "rule_flag") == 0
    assert feature(table, 0, 600, "changes") == 3
    # the second drive starts its own history: nothing carries over from the first
    assert feature(table, 1, 500, "smart_5_max") == 0
    assert feature(table, 1, 500, "smart_5_increases") == 0


def test_features_ignore_everything_after_t() -> None:
    before = table_of([[0, 100, 500]], [[0, 2, 2]], [True])
    later = table_of([[0, 100, 500, 700, 800]], [[0, 2, 2, 50, 90]], [True])
    history_a = History(before, FleetRates.fit(before))
    history_b = History(later, FleetRates.fit(before))
    x_a = history_a.features(np.array([0]), np.array([650.0]))
    x_b = history_b.features(np.array([0]), np.array([650.0]))
    np.testing.assert_array_equal(x_a, x_b)


def test_censor_cuts_rows_failures_and_end() -> None:
    table = table_of([[0, 100, 5000], [0]], [[0, 1, 2], [0]], [True, True])
    table = dataclasses.replace(table, start_day=np.array([16000.0, 16200.0]))
    day = table.start_day[0] + 3000 / 24  # hour 3000 of drive 0
    past = table.censor(day)
    assert len(past) == 1  # drive 1 starts 200 days later, after the cut-off
    assert past.end_hour[0] == pytest.approx(3000)
    assert not past.failed[0]
    assert list(past.obs_hour) == [0, 100]


def test_protocol_points_follow_the_issue() -> None:
    table = table_of([[0], [0], [0]], [[0], [0], [0]], [True, False, False])
    rng = np.random.default_rng(1)
    pts = protocol_points(table, 7, rng)
    pos = pts.label == 1
    assert list(pts.drive[pos]) == [0]
    assert pts.hour[pos][0] == table.end_hour[0] - 7 * 24
    # healthy drives once each, at least 30 days before their last record
    assert sorted(pts.drive[~pos]) == [1, 2]
    assert (pts.hour[~pos] <= table.end_hour[pts.drive[~pos]] - 30 * 24).all()


def test_training_and_fleet_points_never_label_an_unknown_future() -> None:
    table = table_of([[0]] * 40, [[0]] * 40, [i % 4 == 0 for i in range(40)])
    rng = np.random.default_rng(2)
    for pts in (training_points(table, rng), fleet_points(table, rng, every_days=5)):
        to_end = table.end_hour[pts.drive] - pts.hour
        assert (pts.hour >= table.start_hour[pts.drive]).all()
        assert (to_end[pts.label == 1] <= 30 * 24).all()
        assert table.failed[pts.drive[pts.label == 1]].all()
        assert (to_end[pts.label == 0] >= 30 * 24).all()


def test_held_out_split_depends_only_on_the_serial() -> None:
    serials = np.array([f"Z{i:05d}" for i in range(4000)])
    mask = held_out(serials, 0.25, "salt")
    assert 0.22 < mask.mean() < 0.28
    np.testing.assert_array_equal(held_out(serials[::-1], 0.25, "salt"), mask[::-1])


def test_model_rate_is_smoothed_towards_its_maker() -> None:
    table = table_of([[0]] * 6, [[0]] * 6, [True, False, False, False, False, False])
    table = dataclasses.replace(
        table,
        model=np.array(["ST1", "ST1", "ST2", "HGST1", "HGST1", "HGST1"]),
        maker=np.array(["ST", "ST", "ST", "HGST", "HGST", "HGST"]),
    )
    rates = FleetRates.fit(table)
    assert rates.maker["HGST"] < rates.fleet < rates.maker["ST"]
    # ST2 has no failure of its own: its rate lies between 0 and its maker's, not the fleet's
    assert 0 < rates.model["ST2"] < rates.maker["ST"]
    assert rates.model["ST2"] > rates.model["HGST1"]


def test_out_of_fold_rates_never_see_the_drive_itself() -> None:
    n = 200
    failed = np.arange(n) % 5 == 0
    table = table_of([[0]] * n, [[0]] * n, list(failed))
    table = dataclasses.replace(
        table, model=np.array(["ST1" if i < 100 else "ST2" for i in range(n)])
    )
    own_model, own_maker = FleetRates.out_of_fold(table, "salt", folds=5)
    again = FleetRates.out_of_fold(table, "salt", folds=5)
    np.testing.assert_array_equal(own_model, again[0])
    flipped = dataclasses.replace(table, failed=~table.failed)
    for d in (0, 1, 150):
        # flipping one drive's outcome leaves its own out-of-fold rates unchanged
        one = dataclasses.replace(table, failed=np.where(np.arange(n) == d, ~failed, failed))
        m, k = FleetRates.out_of_fold(one, "salt", folds=5)
        assert m[d] == own_model[d] and k[d] == own_maker[d]
    assert not np.array_equal(FleetRates.out_of_fold(flipped, "salt", folds=5)[0], own_model)
    # in-sample rates, by contrast, move with the drive's own outcome
    in_sample = History(table, FleetRates.fit(table)).model_rate
    one = dataclasses.replace(table, failed=np.where(np.arange(n) == 0, ~failed, failed))
    assert in_sample[0] != History(one, FleetRates.fit(one)).model_rate[0]
    history = History(table, FleetRates.fit(table), (own_model, own_maker))
    np.testing.assert_array_equal(history.model_rate, own_model)
