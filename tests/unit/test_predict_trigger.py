"""The switchover trigger: only a sustained, confident risk fires, once, and dry-run reports."""

import pytest

from shadowblk.predict.trigger import Action, SustainedTrigger, TriggerSettings

SETTINGS = TriggerSettings(threshold=0.5, sustain_seconds=600, min_confidence=0.5, rearm_below=0.3)


def feed(trigger: SustainedTrigger, readings: list[tuple[float, float, float]]) -> list[Action]:
    return [trigger.update(t, p, c).action for t, p, c in readings]


def test_fires_once_after_the_risk_is_held_for_the_sustain_time() -> None:
    trigger = SustainedTrigger(SETTINGS)
    actions = feed(trigger, [(t, 0.8, 0.9) for t in range(0, 1300, 60)])
    assert actions.index(Action.SWITCHOVER) == 10  # t = 600 s after the first reading
    assert actions.count(Action.SWITCHOVER) == 1


def test_a_dip_below_the_threshold_restarts_the_count() -> None:
    trigger = SustainedTrigger(SETTINGS)
    readings = [(t, 0.8, 0.9) for t in range(0, 540, 60)] + [(540, 0.4, 0.9)]
    readings += [(t, 0.8, 0.9) for t in range(600, 1260, 60)]
    actions = feed(trigger, readings)
    assert actions.index(Action.SWITCHOVER) == len(readings) - 1  # at t = 1200
    assert trigger.update(1260, 0.8, 0.9).above_since == 600


def test_low_confidence_never_fires() -> None:
    trigger = SustainedTrigger(SETTINGS)
    assert set(feed(trigger, [(t, 0.99, 0.4) for t in range(0, 3600, 60)])) == {Action.NONE}


def test_a_gap_in_readings_restarts_the_count() -> None:
    trigger = SustainedTrigger(TriggerSettings(sustain_seconds=600, max_gap_seconds=300))
    actions = feed(trigger, [(0, 0.9, 0.9), (200, 0.9, 0.9), (900, 0.9, 0.9), (1400, 0.9, 0.9)])
    assert actions == [Action.NONE] * 4  # each gap over 300 s restarted the count
    actions = feed(trigger, [(1600, 0.9, 0.9), (1800, 0.9, 0.9), (2000, 0.9, 0.9)])
    assert actions == [Action.NONE, Action.NONE, Action.SWITCHOVER]


def test_rearms_only_after_falling_below_the_rearm_level() -> None:
    trigger = SustainedTrigger(SETTINGS)
    feed(trigger, [(t, 0.8, 0.9) for t in range(0, 660, 60)])
    # between re-arm level and threshold: still latched, a new run does not fire again
    actions = feed(trigger, [(660, 0.4, 0.9)] + [(t, 0.8, 0.9) for t in range(720, 1500, 60)])
    assert Action.SWITCHOVER not in actions
    actions = feed(trigger, [(1500, 0.2, 0.9)] + [(t, 0.8, 0.9) for t in range(1560, 2300, 60)])
    assert actions.count(Action.SWITCHOVER) == 1


def test_dry_run_reports_instead_of_switching() -> None:
    trigger = SustainedTrigger(TriggerSettings(sustain_seconds=0, dry_run=True))
    decision = trigger.update(0, 0.9, 0.9)
    assert decision.action is Action.REPORT and decision.latched
    assert "above 0.5" in decision.reason


def test_bad_readings_and_settings_are_refused() -> None:
    trigger = SustainedTrigger(SETTINGS)
    trigger.update(100, 0.1, 0.9)
    with pytest.raises(ValueError, match="time order"):
        trigger.update(50, 0.1, 0.9)
    with pytest.raises(ValueError, match="probability"):
        trigger.update(200, 1.2, 0.9)
    with pytest.raises(ValueError, match="rearm_below"):
        TriggerSettings(threshold=0.5, rearm_below=0.6)
