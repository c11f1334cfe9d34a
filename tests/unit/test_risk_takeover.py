"""The failure predictor across a change of leader, on real stores (SQLite, etcd): the trigger's
sustained count and the counters' windows go on from what the last leader stored with the server,
a decision taken is not taken twice, a drain cut short by the leader's death is asked again, and a
stored clock kept under another policy or ahead of this manager's is handled."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shadowblk.manager.risk import RiskMonitor, RiskSettings
from shadowblk.manager.service import Fleet
from shadowblk.manager.store import Store, open_store
from shadowblk.manager.store.model import Volume
from shadowblk.predict.trigger import TriggerSettings

SUSTAIN = TriggerSettings(threshold=0.5, sustain_seconds=10, min_confidence=0.2)


class Leader:
    """One manager's predictor on its own connection to the store, fed through the real
    Fleet.heartbeat (which stores each verdict with the server)."""

    def __init__(self, url: str, trigger: TriggerSettings = SUSTAIN) -> None:
        self.store: Store = open_store(url)
        self.drains: list[str] = []
        self.monitor = RiskMonitor(
            self.store, None, RiskSettings(trigger), lambda s, why: self.drains.append(s)
        )
        self.fleet = Fleet(self.store)
        self.fleet.assess = self.monitor.assess

    def beat(self, now: float, errors: int, checksums: int) -> dict[str, Any]:
        body = {"used_bytes": 0, "io_errors": errors, "checksum_discrepancies": checksums}
        return self.fleet.heartbeat("s1", body, now)["server"]["health"]["failure"]


@pytest.fixture
def leaders(store_url: str) -> Iterator[tuple[Leader, Leader]]:
    a, b = Leader(store_url), Leader(store_url)
    a.fleet.register({"name": "s1", "zone": "z1", "rack": "r1", "capacity_bytes": 1 << 30}, 0.0)
    a.store.create_volume(Volume("v1", 1 << 20, "s1"))
    yield a, b
    a.store.close()
    b.store.close()


def preempts(store: Store) -> list[Any]:
    return [e for e in store.events() if e.kind == "failure-preempt"]


def test_a_new_leader_goes_on_with_the_sustained_count(leaders: tuple[Leader, Leader]) -> None:
    a, b = leaders
    a.beat(0.0, 0, 0)
    for t in range(1, 6):  # errors and mismatches grew: over the threshold from t=1
        doc = a.beat(float(t), 20, 5)
    assert doc["trigger"]["state"] == "pending" and doc["trigger"]["above_since"] == 1.0
    # a leaves, b leads: with the counters' growth and the clock taken over, b fires once
    # the risk has held for 10 s since t=1, not 10 s after it took over
    states = {t: b.beat(float(t), 20, 5)["trigger"]["state"] for t in range(6, 13)}
    assert states == {6: "pending", 7: "pending", 8: "pending", 9: "pending", 10: "pending",
                      11: "fired", 12: "fired"}  # fmt: skip
    assert b.drains == ["s1"] and a.drains == []
    (event,) = preempts(b.store)
    assert "above 0.5 for 10 s" in event.detail["reason"]
    # a leads again: b's drain may have been cut short (v1 is still on s1), so it asks again
    assert a.beat(13.0, 20, 5)["trigger"]["state"] == "fired"
    assert a.drains == ["s1"] and len(preempts(a.store)) == 2
    # v1 has moved: b, leading again, keeps the trigger fired and decides nothing more
    b.store.set_volume_primary("v1", "s2", 1)
    assert b.beat(14.0, 20, 5)["trigger"]["state"] == "fired"
    assert b.drains == ["s1"] and len(preempts(b.store)) == 2


def test_a_dry_run_decision_is_not_repeated_by_the_next_leader(store_url: str) -> None:
    dry = TriggerSettings(threshold=0.5, sustain_seconds=2, min_confidence=0.2, dry_run=True)
    a, b = Leader(store_url, dry), Leader(store_url, dry)
    try:
        a.fleet.register({"name": "s1", "zone": "z1", "rack": "r1", "capacity_bytes": 1}, 0.0)
        a.beat(0.0, 0, 0)
        assert [a.beat(float(t), 20, 5)["trigger"]["state"] for t in (1, 2, 3)] == [
            "pending", "pending", "fired",
        ]  # fmt: skip
        assert b.beat(4.0, 20, 5)["trigger"]["state"] == "fired"
        assert len(preempts(b.store)) == 1
    finally:
        a.store.close()
        b.store.close()


def test_another_policy_or_a_clock_ahead(leaders: tuple[Leader, Leader], store_url: str) -> None:
    a, b = leaders
    a.beat(0.0, 0, 0)
    for t in range(1, 6):
        a.beat(float(t), 20, 5)
    stored = a.store.get_server("s1").health["failure"]
    # another threshold: neither the stored clock nor the counters are this manager's to go on
    # with; the errors it sees have not grown since it started counting
    other = Leader(store_url, TriggerSettings(threshold=0.6, sustain_seconds=10,
                                              min_confidence=0.2))  # fmt: skip
    try:
        doc = other.beat(6.0, 20, 5)
        assert doc["trigger"]["state"] == "armed" and doc["trigger"]["above_since"] is None
        assert doc["signals"]["io_errors_in_window"] == 0
    finally:
        other.store.close()
    # a's verdict as if its clock ran 100 s ahead of b's: taken over, never an error
    server = a.store.get_server("s1")
    server.health = {**server.health, "failure": stored | {"at": 105.0}}
    a.store.put_server(server)
    doc = b.beat(7.0, 20, 5)
    assert not any(r.startswith("predictor error") for r in doc["reasons"]), doc["reasons"]
    assert doc["trigger"]["state"] == "pending" and doc["trigger"]["above_since"] == 1.0
