"""The latency detector: load changes alone never alarm; slow I/O does."""

import numpy as np
import pytest

from shadowblk.predict.latency import LatencySettings, LatencySpikeDetector

CAPACITY_IOPS = 5000.0
SERVICE_MS = 2.0


def healthy_latency(load: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An M/M/1-like device: latency grows with utilisation, with 10% log-normal noise."""
    return SERVICE_MS / (1 - load / CAPACITY_IOPS) * rng.lognormal(0, 0.1, len(load))


def run(latency: np.ndarray, load: np.ndarray) -> list:
    detector = LatencySpikeDetector()
    return [detector.update(float(a), float(b)) for a, b in zip(latency, load, strict=True)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "load_shape",
    ["step_up", "step_down", "ramp", "diurnal", "idle_then_busy"],
)
def test_load_changes_alone_are_never_flagged(seed: int, load_shape: str) -> None:
    rng = np.random.default_rng(seed)
    n = 600
    t = np.arange(n)
    load = {
        "step_up": np.where(t < 300, 200.0, 3000.0),
        "step_down": np.where(t < 300, 3000.0, 150.0),
        "ramp": np.linspace(100, 3500, n),
        "diurnal": 1500 + 1300 * np.sin(t / 40),
        "idle_then_busy": np.where(t < 200, 5.0, np.where(t < 400, 2500.0, 40.0)),
    }[load_shape]
    verdicts = run(healthy_latency(load, rng), load)
    assert all(v.ready for v in verdicts[LatencySettings().warmup :])
    flagged = [i for i, v in enumerate(verdicts) if v.spike]
    assert flagged == []


@pytest.mark.parametrize("seed", range(5))
def test_a_spike_of_slow_io_is_flagged(seed: int) -> None:
    rng = np.random.default_rng(seed)
    load = 1500 + 1000 * np.sin(np.arange(500) / 30)
    latency = healthy_latency(load, rng)
    latency[400:410] *= 8  # ten samples of slow I/O at unchanged load
    verdicts = run(latency, load)
    flagged = {i for i, v in enumerate(verdicts) if v.spike}
    assert flagged == set(range(400, 410))
    assert verdicts[405].z > LatencySettings().threshold
    assert verdicts[405].expected_ms < verdicts[405].latency_ms / 4


def test_slow_io_during_a_load_drop_is_flagged() -> None:
    rng = np.random.default_rng(7)
    load = np.where(np.arange(400) < 300, 2000.0, 200.0)
    latency = healthy_latency(load, rng)
    latency[350:355] = 40.0  # a failing disk: slow although almost idle
    flagged = {i for i, v in enumerate(run(latency, load)) if v.spike}
    assert flagged == set(range(350, 355))


def test_no_verdict_during_warmup_and_bad_samples_rejected() -> None:
    detector = LatencySpikeDetector(LatencySettings(warmup=10))
    first = [detector.update(1.0, 100.0) for _ in range(10)]
    assert not any(v.ready or v.spike for v in first)
    assert detector.update(50.0, 100.0).spike
    with pytest.raises(ValueError, match="latency"):
        detector.update(-1.0, 100.0)
    with pytest.raises(ValueError, match="load"):
        detector.update(1.0, float("nan"))
