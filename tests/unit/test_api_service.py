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
    assert fleet.status()["servers"] == {"total": 3, "up": 1, "down": 2, "draining": 0}
    fleet.heartbeat("b1", {"used_bytes": 0}, 105)
    assert fleet.server("b1")["state"] == "up"
    kinds = [(e["kind"], e["subject"]) for e in fleet.events(0, 100)][-3:]
    assert kinds == [("server-down", "b1"), ("server-down", "c1"), ("server-up", "b1")]
