"""The fleet operations behind the API, on a real SQLite store: space placed counts before an
agent reports it, refusals say why, orders are fenced and addressed, silence marks servers down."""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowblk.manager.api_errors import ApiError
from shadowblk.manager.service import Fleet, round_up
from shadowblk.manager.store import StaleFence
from shadowblk.manager.store.sqlite import SqliteStore

GiB = 1 << 30


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    store = SqliteStore(tmp_path / "meta.db")
    fleet = Fleet(store)
    for name, zone, cap in [("a1", "a", 30), ("b1", "b", 30), ("c1", "c", 100)]:
        fleet.register({"name": name, "zone": zone, "rack": "r", "capacity_bytes": cap * GiB}, 0)
    return fleet


@pytest.fixture
def fence(fleet: Fleet) -> int:
    return fleet.store.claim_leadership("test")


def test_round_up() -> None:
    assert [round_up(n, 4096) for n in (1, 4096, 4097)] == [4096, 4096, 8192]


def test_placed_space_counts_before_any_report(fleet: Fleet, fence: int) -> None:
    first = fleet.create_volume({"name": "v1", "size_bytes": 20 * GiB}, fence)["volume"]
    assert first["primary"] == "c1"  # the emptiest
    # a1 and b1 each have 30 GiB; one of them holds v1's 20 GiB shadow, so it cannot take v2's
    second = fleet.create_volume({"name": "v2", "size_bytes": 20 * GiB}, fence)["volume"]
    assert second["primary"] == "c1"
    assert {s["server"] for s in first["shadows"] + second["shadows"]} == {"a1", "b1"}
    with pytest.raises(ApiError) as refused:
        fleet.create_volume({"name": "v3", "size_bytes": 20 * GiB}, fence)
    assert refused.value.status == 409
    assert "not enough free space: needs 20.0 GiB, has 10.0 GiB" in refused.value.error
    assert {s["name"]: s["allocated_bytes"] for s in fleet.servers()} == {
        "a1": 20 * GiB,
        "b1": 20 * GiB,
        "c1": 40 * GiB,
    }
    # the explanation does not count the volume's own space against it
    explained = fleet.explain("v1")
    assert explained["decision"]["chosen"] == [s["server"] for s in first["shadows"]]


def test_orders_are_fenced_and_addressed(fleet: Fleet, fence: int) -> None:
    made = fleet.create_volume({"name": "v1", "size_bytes": GiB, "primary": "a1"}, fence)
    shadow = made["volume"]["shadows"][0]["server"]
    fleet.delete_volume("v1", fence)
    for server, role in [("a1", "primary"), (shadow, "shadow")]:
        orders = fleet.heartbeat(server, {"used_bytes": 0}, 1)["orders"]
        assert [(o["kind"], o["detail"]["role"], o["fence"]) for o in orders] == [
            ("host-volume", role, fence),
            ("drop-volume", role, fence),
        ]
        since = fleet.heartbeat(server, {"used_bytes": 0, "orders_since": orders[0]["seq"]}, 1)
        assert [o["kind"] for o in since["orders"]] == ["drop-volume"]
    with pytest.raises(StaleFence):
        fleet.create_volume({"name": "v2", "size_bytes": GiB}, fence - 1)


def test_silent_servers_are_marked_down_once(fleet: Fleet) -> None:
    fleet.heartbeat("a1", {"used_bytes": 0}, 100)
    assert fleet.mark_silent_down(timeout_s=6, now=104) == ["b1", "c1"]
    assert fleet.mark_silent_down(timeout_s=6, now=105) == []
    assert fleet.next_silence(timeout_s=6, now=105) == 1  # a1's heartbeat times out at 106
    assert fleet.status()["servers"] == {"total": 3, "up": 1, "down": 2, "draining": 0}
    fleet.heartbeat("b1", {"used_bytes": 0}, 105)
    assert fleet.server("b1")["state"] == "up"
    kinds = [(e["kind"], e["subject"]) for e in fleet.events(0, 100)][-3:]
    assert kinds == [("server-down", "b1"), ("server-down", "c1"), ("server-up", "b1")]


def _switchable(fleet: Fleet, fence: int, in_sync: bool = True) -> str:
    """v1 on a1 with its shadow reported (by its agent, and in step by a1's) at epoch 7."""
    for name in ("a1", "b1", "c1"):
        server = fleet.store.get_server(name)
        server.address, server.control_address = f"{name}:7700", f"{name}:7800"
        fleet.store.put_server(server)
    made = fleet.create_volume({"name": "v1", "size_bytes": GiB, "primary": "a1"}, fence)
    shadow = made["volume"]["shadows"][0]["server"]
    hosted = {"v1": {"role": "shadow", "state": "running", "generation": 1, "epoch": 7}}
    fleet.heartbeat(shadow, {"used_bytes": 0, "hosted": hosted}, 1.0)
    seen = {f"{shadow}:7700": {"in_sync": in_sync, "acked_epoch": 7}}
    primary = {"v1": {"role": "primary", "state": "running", "generation": 1, "shadows": seen}}
    reply = fleet.heartbeat("a1", {"used_bytes": 0, "hosted": primary}, 1.0)
    assert reply["leases"] == {"v1": 1} and reply["lease_s"] == fleet.lease_s
    return shadow


def test_a_planned_switchover_needs_a_shadow_in_step(fleet: Fleet, fence: int) -> None:
    shadow = _switchable(fleet, fence, in_sync=False)
    with pytest.raises(ApiError) as refused:
        fleet.plan_switchover("v1", None)
    assert refused.value.status == 409 and "no shadow that can be promoted" in refused.value.error
    assert fleet.volume("v1")["shadows"][0]["state"] == "syncing"
    seen = {f"{shadow}:7700": {"in_sync": True, "acked_epoch": 7}}
    primary = {"v1": {"role": "primary", "state": "running", "generation": 1, "shadows": seen}}
    fleet.heartbeat("a1", {"used_bytes": 0, "hosted": primary}, 2.0)
    plan = fleet.plan_switchover("v1", None)
    assert (plan["from"], plan["to"], plan["to_control"]) == ("a1", shadow, f"{shadow}:7800")
    assert plan["after"]["generation"] == 2 and plan["after"]["primary"] == shadow
    with pytest.raises(ApiError) as unknown:
        fleet.plan_switchover("v1", "zz")
    assert unknown.value.status == 404


def test_the_generation_is_raised_once(fleet: Fleet, fence: int) -> None:
    shadow = _switchable(fleet, fence)
    after = fleet.raise_generation("v1", shadow, 1)
    assert (after["primary"], after["generation"]) == (shadow, 2)
    assert after["shadows"] == [{"server": "a1", "state": "stale"}]
    with pytest.raises(ApiError) as lost:
        fleet.raise_generation("v1", "a1", 1)
    assert lost.value.status == 409
    assert fleet.heartbeat("a1", {"used_bytes": 0}, 3.0)["leases"] == {}  # no lease any more
    assert fleet.heartbeat(shadow, {"used_bytes": 0}, 3.0)["leases"] == {"v1": 2}


def test_an_emergency_takes_over_only_from_a_silent_server(fleet: Fleet, fence: int) -> None:
    shadow = _switchable(fleet, fence)
    assert fleet.plan_emergency("v1") is None  # a1 is up
    assert fleet.mark_silent_down(5, 10.0) == ["a1", "b1", "c1"]
    hosted = {"v1": {"role": "shadow", "state": "running", "generation": 1, "epoch": 7}}
    fleet.heartbeat(shadow, {"used_bytes": 0, "hosted": hosted}, 10.0)
    assert fleet.orphaned() == ["v1"]
    plan = fleet.plan_emergency("v1")
    assert plan is not None and plan["to"] == shadow and plan["silent_since"] == 1.0
    fleet.heartbeat("a1", {"used_bytes": 0}, 11.0)  # back before the takeover: it keeps v1
    with pytest.raises(ApiError) as back:
        fleet.take_over("v1", shadow, 1, plan["silent_since"])
    assert back.value.status == 409 and fleet.volume("v1")["primary"] == "a1"


def test_switchovers_are_recorded_and_ordered(fleet: Fleet, fence: int) -> None:
    shadow = _switchable(fleet, fence)
    fleet.raise_generation("v1", shadow, 1)
    record = {"volume": "v1", "from": "a1", "to": shadow, "generation": 2, "outcome": "succeeded"}
    fleet.finish_switchover(record, fence)
    assert [r["to"] for r in fleet.switchovers("v1", 10)] == [shadow]
    assert fleet.switchovers("other", 10) == []
    orders = [e for e in fleet.store.events() if e.order_id and "switchover" not in e.kind]
    roles = {
        e.detail["server"]: e.detail["role"]
        for e in orders
        if e.detail["volume"]["generation"] == 2
    }
    assert roles == {shadow: "primary", "a1": "shadow"}
    assert fleet.attach("v1", "http://h:1")["attachments"] == ["http://h:1"]
    assert fleet.attach("v1", "http://h:1")["attachments"] == ["http://h:1"]
    fleet.detach("v1", "http://h:1")
    assert fleet.volume("v1")["attachments"] == []
