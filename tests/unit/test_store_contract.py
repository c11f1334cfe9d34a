"""One contract, two engines: every test here runs against SQLite and against a real etcd."""

import threading
from collections.abc import Iterator

import pytest

from shadowblk.manager.leader import election_for
from shadowblk.manager.store import (
    DuplicateOrder,
    GenerationConflict,
    NotFound,
    StaleFence,
    Store,
    StoreError,
    open_store,
)
from shadowblk.manager.store.model import Event, Server, Shadow, ShadowState, Volume


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def token(store: Store) -> Iterator[int]:
    """Make this test's process the leader, as each engine's election does; yield its token."""
    election = election_for(store, "m1")
    assert election.campaign(timeout_s=5)
    assert election.token is not None
    yield election.token
    election.resign()


def volume(name: str = "v1", **kw) -> Volume:
    return Volume(name=name, size_bytes=1 << 30, primary="s1", shadows=[Shadow("s2")], **kw)


def test_servers_round_trip(store: Store) -> None:
    a = Server("s1", zone="z1", rack="r1", capacity_bytes=10, drive_models=["X1"])
    b = Server("s0", zone="z2", rack="r2", failure_probability=0.25)
    store.put_server(a)
    store.put_server(b)
    assert store.get_server("s1") == a
    assert [s.name for s in store.list_servers()] == ["s0", "s1"]
    a.used_bytes = 7
    store.put_server(a)
    assert store.get_server("s1").used_bytes == 7
    store.delete_server("s0")
    with pytest.raises(NotFound):
        store.get_server("s0")
    with pytest.raises(NotFound):
        store.delete_server("s0")


def test_volumes_round_trip_and_create_refuses_a_taken_name(store: Store) -> None:
    store.create_volume(volume())
    got = store.get_volume("v1")
    assert got == volume()
    assert got.shadows[0].state is ShadowState.SYNCING
    with pytest.raises(StoreError, match="exists"):
        store.create_volume(volume())
    store.delete_volume("v1")
    assert store.list_volumes() == []
    with pytest.raises(NotFound):
        store.get_volume("v1")


def test_put_volume_cannot_change_the_generation(store: Store) -> None:
    store.create_volume(volume())
    changed = volume(generation=99)
    changed.shadows[0].state = ShadowState.IN_SYNC
    store.put_volume(changed)
    got = store.get_volume("v1")
    assert got.generation == 1
    assert got.shadows[0].state is ShadowState.IN_SYNC
    with pytest.raises(NotFound):
        store.put_volume(volume("nope"))


def test_set_primary_raises_generation_and_swaps_roles(store: Store) -> None:
    store.create_volume(volume())
    assert store.set_volume_primary("v1", "s2", expected_generation=1) == 2
    got = store.get_volume("v1")
    assert (got.primary, got.generation) == ("s2", 2)
    assert got.shadows == [Shadow("s1", ShadowState.STALE)]
    (event,) = [e for e in store.events() if e.kind == "switchover"]
    assert event.detail == {"from": "s1", "to": "s2", "generation": 2}


def test_set_primary_with_a_stale_generation_is_a_conflict(store: Store) -> None:
    store.create_volume(volume())
    store.set_volume_primary("v1", "s2", expected_generation=1)
    with pytest.raises(GenerationConflict) as err:
        store.set_volume_primary("v1", "s3", expected_generation=1)
    assert (err.value.expected, err.value.actual) == (1, 2)
    assert store.get_volume("v1").primary == "s2"
    with pytest.raises(NotFound):
        store.set_volume_primary("nope", "s3", expected_generation=1)


def test_concurrent_switchovers_exactly_one_wins(store_url: str) -> None:
    """Eight writers, each with its own connection, race for generation 1 → 2."""
    setup = open_store(store_url)
    setup.create_volume(volume())
    wins, conflicts = [], []
    barrier = threading.Barrier(8)

    def racer(i: int) -> None:
        mine = open_store(store_url)
        barrier.wait()
        try:
            wins.append(mine.set_volume_primary("v1", f"n{i}", expected_generation=1))
        except GenerationConflict:
            conflicts.append(i)
        finally:
            mine.close()

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins == [2]
    assert len(conflicts) == 7
    assert setup.get_volume("v1").generation == 2
    assert len([e for e in setup.events() if e.kind == "switchover"]) == 1
    setup.close()


def test_event_log_is_append_only_and_readable_since(store: Store) -> None:
    first = store.append_event(Event("server-down", "s1"))
    second = store.append_event(Event("server-up", "s1", detail={"after_s": 3}))
    assert second > first
    assert [e.kind for e in store.events()] == ["server-down", "server-up"]
    (only,) = store.events(since=first)
    assert (only.seq, only.detail) == (second, {"after_s": 3})
    with pytest.raises(StoreError, match="give_order"):
        store.append_event(Event("order", "v1", order_id="x"))


def test_revision_grows_with_every_change(store: Store) -> None:
    seen = [store.revision()]
    store.put_server(Server("s1", zone="z", rack="r"))
    seen.append(store.revision())
    store.create_volume(volume())
    seen.append(store.revision())
    store.set_volume_primary("v1", "s2", 1)
    seen.append(store.revision())
    with pytest.raises(GenerationConflict):
        store.set_volume_primary("v1", "s2", 1)
    seen.append(store.revision())
    assert seen[0] < seen[1] < seen[2] < seen[3] == seen[4]


def test_orders_need_the_current_leaders_fence(store: Store, token: int) -> None:
    order = Event("switchover-order", "v1", order_id="o1")
    with pytest.raises(StaleFence):
        store.give_order(Event(**{**order.to_dict(), "fence": token - 1}))
    seq = store.give_order(Event(**{**order.to_dict(), "fence": token}))
    assert [(e.order_id, e.fence, e.seq) for e in store.events()] == [("o1", token, seq)]
    with pytest.raises(StaleFence):
        store.give_order(Event("switchover-order", "v1", order_id="o2", fence=token + 1000))
    with pytest.raises(StoreError, match="order_id"):
        store.give_order(Event("switchover-order", "v1", fence=token))


def test_an_order_is_never_given_twice(store: Store, token: int) -> None:
    store.give_order(Event("scrub-order", "v1", order_id="scrub-v1-7", fence=token))
    with pytest.raises(DuplicateOrder):
        store.give_order(Event("scrub-order", "v1", order_id="scrub-v1-7", fence=token))
    assert len(store.events()) == 1


def test_a_new_leader_fences_the_old_one(store_url: str) -> None:
    """The old leader's token is refused as soon as another leader took over."""
    store, other = open_store(store_url), open_store(store_url)
    first, second = election_for(store, "m1"), election_for(other, "m2")
    assert first.campaign(timeout_s=5)
    old_token = first.token
    assert old_token is not None and store.leader().holder == "m1"
    assert not second.campaign(timeout_s=0.5), "a standby must not lead while the leader lives"
    assert first.is_leader and not second.is_leader
    first.resign()
    assert store.leader() is None and not first.is_leader
    assert second.campaign(timeout_s=5) and second.is_leader
    assert second.token is not None and second.token > old_token
    with pytest.raises(StaleFence, match="m2"):
        store.give_order(Event("o", "v1", order_id="late", fence=old_token))
    second.resign()
    other.close()
    store.close()
