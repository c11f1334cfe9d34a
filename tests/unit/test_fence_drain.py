"""A primary's drain before a planned switchover's pause (Fence.drain): rounds repeat while they
take long, but a round the deadline cuts short does not undo an earlier one that drained."""

from __future__ import annotations

import time
from types import SimpleNamespace

from shadowblk.nbd import fence

ROUND_S = 0.2  # what each round takes: more than CONVERGED_MS, so the drain goes on


class SlowShadows:
    """A replicator whose shadows take ROUND_S to apply each cut: a drain given less time
    waits it out and fails, as Replicator.drain does."""

    def __init__(self) -> None:
        self.last_cut = 0
        self.drained: list[int] = []  # the epochs each successful round drained

    def drain(self, timeout: float) -> bool:
        self.last_cut += 1
        if timeout < ROUND_S:
            time.sleep(timeout)
            return False
        time.sleep(ROUND_S)
        self.drained.append(self.last_cut)
        return True


def drain(timeout_s: float) -> tuple[dict, SlowShadows]:
    f = fence.Fence(lease_s=None)
    rep = SlowShadows()
    f.replication = SimpleNamespace(replicator=rep)  # type: ignore[assignment]
    return f.drain(timeout_s), rep


def test_a_round_short_of_time_does_not_undo_one_that_drained() -> None:
    answer, rep = drain(2.5 * ROUND_S)  # room for two rounds, not three
    assert answer["drained"], answer
    assert rep.drained and answer["epoch"] == rep.drained[-1]
    assert len(answer["rounds_ms"]) < fence.DRAIN_ROUNDS


def test_a_drain_that_never_caught_up_says_so() -> None:
    answer, rep = drain(ROUND_S / 2)
    assert not answer["drained"] and rep.drained == []
    assert answer["epoch"] == rep.last_cut and len(answer["rounds_ms"]) == 1
