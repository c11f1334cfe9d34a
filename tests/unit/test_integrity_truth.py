"""Which side holds the truth for a block: every case of the rule in shadowblk.integrity.truth."""

import pytest

from shadowblk.integrity.truth import SideView, decide

GOOD, ROT, NEW = 0x1111, 0x2222, 0x3333


def sides(p_actual, p_recorded, s_actual, s_recorded, p_epoch=5, s_epoch=5, rebuilt=()):
    return (
        SideView("primary", p_actual, p_recorded, p_epoch, "primary" in rebuilt),
        SideView("shadow", s_actual, s_recorded, s_epoch, "shadow" in rebuilt),
    )


@pytest.mark.parametrize(
    ("views", "truth", "source", "fixes"),
    [
        # bit rot on one side: the other side's data matches the record
        (sides(ROT, GOOD, GOOD, GOOD), GOOD, "shadow", [("primary", "data", True)]),
        (sides(GOOD, GOOD, ROT, GOOD), GOOD, "primary", [("shadow", "data", True)]),
        # a wrong record on one side: the data agree, one record confirms them
        (sides(GOOD, ROT, GOOD, GOOD), GOOD, "shadow", [("primary", "map", False)]),
        # the shadow is an epoch behind: the newer map's record wins
        (sides(NEW, NEW, GOOD, GOOD, 6, 5), NEW, "primary", [("shadow", "stale", True)]),
        # the newer side rotted, the older side still holds what the newer map recorded
        (
            sides(ROT, NEW, NEW, GOOD, 6, 5),
            NEW,
            "shadow",
            [("primary", "data", True), ("shadow", "stale", False)],
        ),
        # a rebuilt map gives no evidence; the data agree with the other record
        (sides(GOOD, GOOD, GOOD, GOOD, rebuilt=("shadow",)), GOOD, "primary", []),
    ],
)
def test_resolved_cases(views, truth, source, fixes) -> None:
    verdict = decide(*views)
    assert verdict.resolved
    assert (verdict.truth, verdict.source) == (truth, source)
    assert [(f.side, f.kind, f.data) for f in verdict.fixes] == fixes


@pytest.mark.parametrize(
    ("views", "reason"),
    [
        (sides(GOOD, GOOD, NEW, NEW), "diverged"),
        (sides(ROT, GOOD, NEW, GOOD), "no side's data"),
        (sides(ROT, NEW, GOOD, GOOD, 6, 5), "no side's data"),
        (sides(NEW, NEW, GOOD, GOOD, rebuilt=("primary",)), "rebuilt"),
    ],
)
def test_unresolved_cases(views, reason) -> None:
    verdict = decide(*views)
    assert not verdict.resolved and verdict.fixes == ()
    assert reason in verdict.reason
