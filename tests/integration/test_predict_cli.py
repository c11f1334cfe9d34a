"""`shadowblk predict` as a real process on a seeded sample of the shared Backblaze data."""

import json
import resource
import subprocess
from pathlib import Path

import pytest

from tests.predict_lab import DATA, train, write_sample
from tests.procs import SHADOWBLK

pytestmark = pytest.mark.skipif(not DATA.exists(), reason="shared data not beside the repository")


def run(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([*SHADOWBLK, *args], capture_output=True, text=True, timeout=timeout)


def cpu_seconds_of_children() -> float:
    """CPU time used by finished child processes: on a shared machine wall time measures the
    neighbours, not the work."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every row of a seeded 15% of the drives (about 13,000 drives, 800 failed)."""
    return write_sample(tmp_path_factory.mktemp("predict") / "sample.csv.gz")


@pytest.fixture(scope="module")
def trained(sample: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    model = tmp_path_factory.mktemp("model") / "smart-model.json"
    started = cpu_seconds_of_children()
    out = train(sample, model, "--json")
    assert out.returncode == 0, out.stderr
    evaluated = run("predict", "evaluate", "--model", str(model), "--data", str(sample), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    return model, json.loads(evaluated.stdout), cpu_seconds_of_children() - started


def test_train_and_evaluate_on_a_sample_is_fast_and_meets_the_floor(trained) -> None:
    _, report, cpu_seconds = trained
    assert cpu_seconds < 60
    at7 = next(r for r in report["leads"] if r["lead_days"] == 7)
    assert at7["positives"] > 150
    assert at7["auc"] >= 0.85
    assert at7["at_fpr"]["0.01"] >= 0.35
    assert at7["recall_at_rule_fpr"] >= at7["rule"]["recall"]
    calibration = report["calibration"]
    assert calibration["brier"] < calibration["brier_base_rate"]


def test_training_is_reproducible(trained, sample: Path, tmp_path: Path) -> None:
    model, _, _ = trained
    again = tmp_path / "again.json"
    out = train(sample, again)
    assert out.returncode == 0, out.stderr
    assert again.read_bytes() == model.read_bytes()


def test_score_ranks_drives_with_reasons(trained, sample: Path) -> None:
    model, _, _ = trained
    out = run("predict", "score", "--model", str(model), "--data", str(sample), "--json")
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout)
    probs = [s["probability"] for s in scores]
    assert probs == sorted(probs, reverse=True)
    assert all(0 <= p <= 1 for p in probs)
    top = scores[0]
    assert top["drivers"] and all(d["contribution"] > 0 for d in top["drivers"])
    text = run("predict", "score", "--model", str(model), "--data", str(sample), "--top", "3")
    assert len(text.stdout.splitlines()) == 3


def test_model_loads_in_under_a_second(trained) -> None:
    model, _, _ = trained
    code = "from pathlib import Path; import sys, time; from shadowblk.predict.model import Model\n"
    code += (
        f"t = time.perf_counter(); Model.load(Path({str(model)!r})); print(time.perf_counter() - t)"
    )
    out = subprocess.run([SHADOWBLK[0], "-c", code], capture_output=True, text=True, timeout=60)
    assert float(out.stdout) < 1.0
    assert model.stat().st_size < 1_000_000


def test_bad_inputs_are_clear_errors(trained, tmp_path: Path) -> None:
    model, _, _ = trained
    garbage = tmp_path / "garbage.csv"
    garbage.write_text("date,serial_number,model,failure,smart_5_raw\n2016-01-01,A,M,0,lots\n")
    out = run("predict", "score", "--model", str(model), "--data", str(garbage))
    assert out.returncode == 1
    assert "column 'smart_5_raw' is 'lots', not a number" in out.stderr
    assert "Traceback" not in out.stderr
    future = tmp_path / "future.json"
    doc = json.loads(model.read_text()) | {"format_version": 99}
    future.write_text(json.dumps(doc))
    out = run("predict", "evaluate", "--model", str(future), "--data", str(garbage))
    assert out.returncode == 1
    assert "format_version 99 is not supported" in out.stderr
    missing = tmp_path / "missing.csv"
    missing.write_text("serial_number,model,smart_5\nA,M,0\n")
    out = run("predict", "train", "--data", str(missing), "--out", str(tmp_path / "m.json"))
    assert out.returncode == 1 and "not SMART history" in out.stderr
