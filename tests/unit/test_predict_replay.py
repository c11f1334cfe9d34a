"""Replaying one drive's daily SMART series day by day gives the offline scores, and reacts."""

from pathlib import Path

import numpy as np
import pytest

from shadowblk.predict.loaders import DataFormatError, load_drives
from shadowblk.predict.model import Model
from shadowblk.predict.replay import DriveScorer, replay
from shadowblk.predict.sampling import held_out
from shadowblk.predict.scoring import score_latest
from shadowblk.predict.training import train

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hds.csv.gz"
HEADER = "date,serial_number,model,capacity_bytes,failure,smart_5_raw,smart_9_raw,smart_12_raw,"
HEADER += "smart_187_raw,smart_197_raw,smart_198_raw"
DAYS = 200


@pytest.fixture(scope="module")
def model() -> Model:
    """A small model trained on a seeded tenth of the shared data."""
    if not DATA.exists():
        pytest.skip("shared data not beside the repository")
    table = load_drives([DATA])
    table = table.subset(held_out(table.serial, 0.1, "replay-test"))
    return train(table, seed=5, tree_params={"max_iter": 60})


def failing_drive(path: Path, serial: str = "Z300ABCD") -> Path:
    """A Seagate that starts reallocating sectors on day 150 and fails on its last day."""
    lines = [HEADER]
    for d in range(DAYS):
        date = np.datetime64("2016-01-01") + d
        bad = max(0, d - 150)
        lines.append(
            f"{date},{serial},ST4000DM000,4000787030016,{int(d == DAYS - 1)},{8 * bad},"
            f"{20000 + 24 * d},{5 + d // 60},{bad // 3},{16 * bad},{8 * bad}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_replay_yields_one_observation_a_day_in_order(tmp_path: Path) -> None:
    obs = list(replay(failing_drive(tmp_path / "z.csv")))
    assert len(obs) == DAYS
    assert [o.day for o in obs] == sorted(o.day for o in obs)
    assert obs[0].date == "2016-01-01" and obs[0].power_on_hours == 20000
    assert obs[160].values[5] == 80 and obs[160].values[10] is None
    assert [o.failure for o in obs].index(True) == DAYS - 1


def test_day_by_day_scores_rise_and_match_offline_scoring(model: Model, tmp_path: Path) -> None:
    path = failing_drive(tmp_path / "z.csv")
    scorer = DriveScorer(model)
    scores = [scorer.observe(o) for o in replay(path)]
    quiet = scores[140]["probability"]
    assert scores[-1]["probability"] > 5 * quiet
    reasons = {d["feature"] for d in scores[-1]["drivers"]}
    assert any(f.startswith(("smart_5", "smart_197", "smart_198", "rule")) for f in reasons)
    offline = score_latest(model, load_drives([path]))[0]
    assert offline["probability"] == pytest.approx(scores[-1]["probability"], rel=1e-12)


def test_replay_errors_are_clear(model: Model, tmp_path: Path) -> None:
    one = failing_drive(tmp_path / "a.csv", "A").read_text()
    two = failing_drive(tmp_path / "b.csv", "B").read_text().split("\n", 1)[1]
    both = tmp_path / "both.csv"
    both.write_text(one + two)
    with pytest.raises(DataFormatError, match="2 drives; name the one"):
        list(replay(both))
    with pytest.raises(DataFormatError, match="no drive 'C'"):
        list(replay(both, "C"))
    first, second = list(replay(both, "A"))[:2]
    scorer = DriveScorer(model)
    scorer.observe(second)
    with pytest.raises(ValueError, match="date order"):
        scorer.observe(first)
