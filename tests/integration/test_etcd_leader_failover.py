"""Several managers, real processes: the leader is killed (-9) or frozen, a standby takes over
within 10 s, and no order is ever given twice or by a leader that lost its lease."""

import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import pytest

from shadowblk.manager.store import StaleFence, open_store
from shadowblk.manager.store.model import Event
from tests.etcd import start_etcd
from tests.procs import Processes

ORDERS = 30

# A manager reduced to its leadership loop: campaign, then give the orders order-0..N-1 in
# turn. It never looks at the log first: a duplicate must be refused by the store. It trusts its
# memory of leading (as a frozen process would), so a stale fence must be refused by the store.
MANAGER = """
import sys, time
from shadowblk.manager.leader import election_for
from shadowblk.manager.store import DuplicateOrder, StaleFence, open_store
from shadowblk.manager.store.model import Event

url, holder, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = open_store(url)
election = election_for(store, holder, ttl_s=3)
election.campaign()
print("leader", election.token, flush=True)
gave = duplicates = 0
for i in range(count):
    order = Event("rebalance", f"v{i}", order_id=f"order-{i}", fence=election.token)
    try:
        store.give_order(order)
        gave += 1
    except DuplicateOrder:
        duplicates += 1
    except StaleFence:
        print("fenced", election.token, flush=True)
        sys.exit(3)
    time.sleep(0.1)
print("done", gave, duplicates, flush=True)
time.sleep(600)
"""


@pytest.fixture(params=["etcd", "sqlite"])
def store_url(request: pytest.FixtureRequest, procs: Processes, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'meta.db'}"
    else:
        _, url = start_etcd(procs, tmp_path / "etcd")
        yield url.replace("http://", "etcd://")


def start_manager(procs: Processes, tmp_path: Path, url: str, name: str) -> Popen:
    script = tmp_path / "manager.py"
    script.write_text(MANAGER)
    return procs.start([sys.executable, str(script), url, name, str(ORDERS)], name=name)


def orders(url: str) -> list[Event]:
    store = open_store(url)
    try:
        return [e for e in store.events() if e.order_id]
    finally:
        store.close()


def wait_for_orders(url: str, count: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while len(orders(url)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} orders in {timeout_s} s"
        time.sleep(0.05)


def test_standby_takes_over_within_10s_of_kill_9(
    procs: Processes, tmp_path: Path, store_url: str
) -> None:
    first = start_manager(procs, tmp_path, store_url, "m1")
    first_token = int(procs.wait_ready(first, "leader ").split()[1])
    second = start_manager(procs, tmp_path, store_url, "m2")
    wait_for_orders(store_url, 8)
    assert second.poll() is None  # standing by, not leading

    procs.stop(first, signal.SIGKILL)
    killed_at = time.monotonic()
    second_token = int(procs.wait_ready(second, "leader ", timeout=15).split()[1])
    takeover_s = time.monotonic() - killed_at
    print(f"takeover after kill -9: {takeover_s:.2f} s")
    assert takeover_s < 10
    assert second_token > first_token

    _, gave, duplicates = procs.wait_ready(second, "done ", timeout=20).split()
    log = orders(store_url)
    counts = Counter(e.order_id for e in log)
    assert sorted(counts) == sorted(f"order-{i}" for i in range(ORDERS))
    assert set(counts.values()) == {1}, "an order was given twice"
    by_first = [e for e in log if e.fence == first_token]
    assert {e.fence for e in log} == {first_token, second_token}
    assert int(duplicates) == len(by_first) >= 8
    assert int(gave) == ORDERS - len(by_first)


def test_frozen_leader_is_fenced_after_its_lease_expires(procs: Processes, tmp_path: Path) -> None:
    """SIGSTOP outlives the lease: the standby leads; the old leader, woken, is refused."""
    _, url = start_etcd(procs, tmp_path / "etcd")
    url = url.replace("http://", "etcd://")
    first = start_manager(procs, tmp_path, url, "m1")
    first_token = int(procs.wait_ready(first, "leader ").split()[1])
    second = start_manager(procs, tmp_path, url, "m2")
    wait_for_orders(url, 5)

    first.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    second_token = int(procs.wait_ready(second, "leader ", timeout=15).split()[1])
    assert time.monotonic() - frozen_at < 10
    first.send_signal(signal.SIGCONT)

    assert procs.wait_ready(first, "fenced ", timeout=10) == f"fenced {first_token}"
    assert first.wait(10) == 3
    procs.wait_ready(second, "done ", timeout=20)
    log = orders(url)
    assert set(Counter(e.order_id for e in log).values()) == {1}
    assert len(log) == ORDERS
    store = open_store(url)
    with pytest.raises(StaleFence):
        store.give_order(Event("rebalance", "v0", order_id="late", fence=first_token))
    assert store.leader().token == second_token
    store.close()


def test_leader_notices_a_lost_lease(procs: Processes, tmp_path: Path) -> None:
    """The lease revoked behind the leader's back (as when etcd expired it): the keep-alive
    finds out and `is_leader` turns false within the TTL: it never believes longer than etcd."""
    from shadowblk.manager.leader import EtcdElection
    from shadowblk.manager.store.etcd import EtcdStore

    _, url = start_etcd(procs, tmp_path / "etcd")
    store = EtcdStore(url)
    election = EtcdElection(store, "m1", ttl_s=3)
    assert election.campaign(timeout_s=5) and election.is_leader
    store.client.post(store.client.get_url("/kv/lease/revoke"), json={"ID": election._lease})
    assert store.leader() is None
    deadline = time.monotonic() + 3
    while election.is_leader:
        assert time.monotonic() < deadline, "still believes it leads"
        time.sleep(0.05)
    election.resign()
    store.close()
