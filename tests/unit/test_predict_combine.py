"""The combiner: SMART risk per server, shifted by live signals, with confidence and reasons."""

import math

import pytest

from shadowblk.predict.combine import CombinerSettings, ServerSignals, combine


def test_smart_only_is_the_chance_that_any_disk_fails() -> None:
    risk = combine(ServerSignals(disk_probabilities={"sda": 0.1, "sdb": 0.2}, smart_age_hours=2))
    assert risk.probability == pytest.approx(1 - 0.9 * 0.8)
    assert risk.confidence == pytest.approx(0.55)
    assert risk.level == "medium"
    assert "worst sdb (0.200)" in risk.explanation()


def test_each_signal_at_full_weight_multiplies_the_odds_by_its_ratio() -> None:
    s = CombinerSettings()
    base = ServerSignals(disk_probabilities={"sda": 0.05}, smart_age_hours=1)
    odds = 0.05 / 0.95
    full = ServerSignals(
        disk_probabilities={"sda": 0.05},
        smart_age_hours=1,
        latency_spike_share=0.5,  # beyond full: capped
        io_errors=s.error_full,
        checksum_discrepancies=s.checksum_full,
    )
    risk = combine(full, s)
    want = odds * s.latency_lr * s.error_lr * s.checksum_lr
    assert risk.probability == pytest.approx(want / (1 + want))
    assert risk.confidence == pytest.approx(1.0) and risk.level == "high"
    # strongest evidence first
    assert [e.signal for e in risk.evidence][:3] == ["checksums", "errors", "latency"]
    assert combine(base, s).probability < risk.probability


def test_half_the_evidence_gives_half_the_log_odds() -> None:
    s = CombinerSettings()
    risk = combine(ServerSignals(io_errors=s.error_full // 2), s)
    shift = next(e for e in risk.evidence if e.signal == "errors").log_odds
    assert shift == pytest.approx(0.5 * math.log(s.error_lr))


def test_missing_or_stale_smart_falls_back_to_the_prior_with_low_confidence() -> None:
    s = CombinerSettings()
    stale = combine(ServerSignals(disk_probabilities={"sda": 0.9}, smart_age_hours=100), s)
    assert stale.probability == pytest.approx(s.prior)
    assert "stale" in stale.explanation()
    missing = combine(ServerSignals(latency_spike_share=0.0, io_errors=0), s)
    assert missing.probability == pytest.approx(s.prior)
    assert missing.level == "low" and missing.confidence == pytest.approx(0.3)


def test_quiet_signals_lower_nothing_but_raise_confidence() -> None:
    smart = {"sda": 0.3}
    quiet = ServerSignals(smart, 1, latency_spike_share=0.0, io_errors=0, checksum_discrepancies=0)
    assert combine(quiet).probability == pytest.approx(0.3)
    assert combine(quiet).confidence > combine(ServerSignals(smart, 1)).confidence


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="probability"):
        combine(ServerSignals(disk_probabilities={"sda": 1.5}))
    with pytest.raises(ValueError, match="negative"):
        combine(ServerSignals(io_errors=-1))
