"""New shadows for volumes short of them: a shadow whose server stays down is replaced on a
server that is up (chosen by placement), the primary and the new shadow are ordered, the lost
copy is ordered dropped; nothing happens while the primary is down or before the grace time."""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowblk.manager import replenish, service
from shadowblk.manager.service import Fleet
from shadowblk.manager.store.sqlite import SqliteStore

GiB = 1 << 30
TIMEOUT = 2.0


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    fleet = Fleet(SqliteStore(tmp_path / "meta.db"))
    for name, zone in [("s1", "a"), ("s2", "b"), ("s3", "c")]:
        fleet.register({"name": name, "zone": zone, "rack": "r", "capacity_bytes": 10 * GiB}, 0)
    return fleet


@pytest.fixture
def fence(fleet: Fleet) -> int:
    return fleet.store.claim_leadership("test")


def silence(fleet: Fleet, server: str, at: float) -> None:
    """SERVER's last heartbeat is at AT; the others go on; SERVER is marked down."""
    for name in ("s1", "s2", "s3"):
        fleet.heartbeat(name, {"used_bytes": 0}, at)
    for name in ("s1", "s2", "s3"):
        if name != server:
            fleet.heartbeat(name, {"used_bytes": 0}, at + TIMEOUT + 1)
    assert fleet.mark_silent_down(TIMEOUT, at + TIMEOUT + 1) == [server]


def test_a_shadow_whose_server_stays_down_is_replaced(fleet: Fleet, fence: int) -> None:
    volume = fleet.create_volume({"name": "v1", "size_bytes": GiB, "primary": "s1"}, fence)
    (lost,) = [s["server"] for s in volume["volume"]["shadows"]]
    (spare,) = {"s2", "s3"} - {lost}
    silence(fleet, lost, at=10)
    soon = 10 + TIMEOUT + replenish.REPLACE_AFTER_S - 1
    assert replenish.short(fleet, TIMEOUT, soon) == []  # a restart is not a loss yet
    later = soon + 2
    assert replenish.short(fleet, TIMEOUT, later) == ["v1"]
    detail = replenish.replace_lost(fleet, "v1", TIMEOUT, later, fence)
    assert detail is not None and (detail["placed"], detail["replaced"]) == ([spare], [lost])
    assert [s["server"] for s in fleet.volume("v1")["shadows"]] == [spare]
    assert replenish.short(fleet, TIMEOUT, later) == []
    assert replenish.replace_lost(fleet, "v1", TIMEOUT, later, fence) is None

    orders = [e for e in fleet.store.events() if e.order_id and "placed" not in e.kind]
    last = {e.detail["server"]: (e.kind, e.detail["role"]) for e in orders[-3:]}
    assert last == {"s1": ("host-volume", "primary"), spare: ("host-volume", "shadow"),
                    lost: ("drop-volume", "shadow")}  # fmt: skip


def test_nothing_is_placed_while_the_primary_is_down(fleet: Fleet, fence: int) -> None:
    fleet.create_volume({"name": "v1", "size_bytes": GiB, "primary": "s1"}, fence)
    silence(fleet, "s1", at=10)
    assert replenish.short(fleet, TIMEOUT, 100) == []  # the emergency switchover comes first


def test_no_server_to_take_it_places_nothing(fleet: Fleet, fence: int) -> None:
    fleet.create_volume({"name": "v1", "size_bytes": GiB, "primary": "s1", "shadows": 2}, fence)
    silence(fleet, "s2", at=10)
    assert replenish.short(fleet, TIMEOUT, 100) == ["v1"]
    assert replenish.replace_lost(fleet, "v1", TIMEOUT, 100, fence) is None
    assert sorted(s["server"] for s in fleet.volume("v1")["shadows"]) == ["s2", "s3"]


def test_an_aborted_switchover_orders_no_roles(fleet: Fleet, fence: int) -> None:
    volume = fleet.create_volume({"name": "v1", "size_bytes": GiB, "primary": "s1"}, fence)
    (shadow,) = [s["server"] for s in volume["volume"]["shadows"]]
    fleet.raise_generation("v1", shadow, 1)
    before = len([e for e in fleet.store.events() if e.order_id])
    record = {"volume": "v1", "from": "s1", "to": shadow, "generation": 2, "outcome": "aborted"}
    fleet.finish_switchover(record, fence)
    assert len([e for e in fleet.store.events() if e.order_id]) == before
    assert fleet.switchovers("v1", 10)[-1]["outcome"] == "aborted"


def abort(fleet: Fleet, fence: int, outcome: str, result: str) -> tuple[str, int]:
    """A planned switchover of v1 (primary s1) whose compare stopped the promotion after the
    generation was raised; the target's name and the number of orders before it ended."""
    volume = fleet.create_volume({"name": "v1", "size_bytes": GiB, "primary": "s1"}, fence)
    (target,) = [s["server"] for s in volume["volume"]["shadows"]]
    fleet.raise_generation("v1", target, 1)
    before = len(orders(fleet))
    record = {"volume": "v1", "from": "s1", "to": target, "generation": 2, "outcome": outcome,
              "error": "no copy to trust", "checksums": {"result": result}}  # fmt: skip
    fleet.finish_switchover(record, fence)
    return target, before


def orders(fleet: Fleet) -> list[tuple[str, str, str]]:
    return [(e.kind, e.detail["server"], e.detail["role"]) for e in fleet.store.events()
            if e.order_id]  # fmt: skip


@pytest.mark.parametrize("outcome,result", [("aborted", "mismatch"), ("failed", "repair-failed")])
def test_an_aborted_switchover_blocks_the_volume_until_an_operator_decides(
    fleet: Fleet, fence: int, outcome: str, result: str
) -> None:
    target, before = abort(fleet, fence, outcome, result)
    assert "aborted" in fleet.volume("v1")["blocked"]
    assert len(orders(fleet)) == before  # nothing ordered: no promotion of the rejected copy
    # the old primary, a stale shadow in the store now, stays down: not replaced, and the
    # target is not ordered primary by the replacement
    silence(fleet, "s1", at=10)
    later = 10 + TIMEOUT + replenish.REPLACE_AFTER_S + 10
    assert replenish.short(fleet, TIMEOUT, later) == []
    assert replenish.replace_lost(fleet, "v1", TIMEOUT, later, fence) is None
    assert fleet.heartbeat(target, {"used_bytes": 0}, later)["leases"] == {}
    with pytest.raises(service.Refused):
        fleet.plan_switchover("v1", None)
    with pytest.raises(service.Refused):
        fleet.plan_emergency("v1")
    assert len(orders(fleet)) == before

    fleet.unblock("v1", fence)  # the operator keeps the target's copy
    assert fleet.volume("v1")["blocked"] == ""
    assert ("host-volume", target, "primary") in orders(fleet)[before:]
    with pytest.raises(service.Refused):
        fleet.unblock("v1", fence)
