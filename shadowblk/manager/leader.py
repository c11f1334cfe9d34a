"""Which manager leads: one leader gives orders, the others stand by and take over on its death.

etcd: the leader key is created (compare create_revision == 0) under a lease of TTL ≤ 5 s that
a keep-alive thread renews; when the leader dies the lease expires, etcd deletes the key, and a
standby polling it creates it. The key's create_revision is the fencing token: it grows with
every new leader, and the store refuses an order whose token is not the current key's.

SQLite: one host, so an exclusive flock on PATH.leader decides; the kernel drops it when the
process dies. The token is a counter in the database, raised by each new lock holder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from typing import Protocol

from etcd3gw.exceptions import Etcd3Exception

from shadowblk.manager.store.etcd import EtcdStore, b64, client_for, compare, put
from shadowblk.manager.store.interface import Store, StoreError
from shadowblk.manager.store.sqlite import SqliteStore

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a standby looks at the leader key


class LeaderElection(Protocol):
    token: int | None  # the fencing token of this process's leadership, None when not leading

    def campaign(self, timeout_s: float | None = None) -> bool:
        """Block until this process leads (True) or TIMEOUT_S passed (False)."""

    @property
    def is_leader(self) -> bool: ...

    def resign(self) -> None:
        """Stop leading at once, so that a standby can take over without waiting for a TTL."""


def election_for(store: Store, holder: str, ttl_s: int = 3) -> LeaderElection:
    """The election that matches STORE's engine (the store checks the fences it hands out)."""
    if isinstance(store, EtcdStore):
        return EtcdElection(store, holder, ttl_s)
    if isinstance(store, SqliteStore):
        return LockFileElection(store, holder)
    raise StoreError(f"no leader election for {type(store).__name__}")


def _deadline(timeout_s: float | None) -> float:
    return float("inf") if timeout_s is None else time.monotonic() + timeout_s


class EtcdElection:
    """Leadership through an etcd lease on the store's leader key."""

    def __init__(self, store: EtcdStore, holder: str, ttl_s: int = 3) -> None:
        if not 2 <= ttl_s <= 5:
            raise ValueError("the lease TTL must be 2..5 s: etcd's floor, and takeover within 10 s")
        # its own client: the keep-alive thread must not share the store's HTTP session
        self.client = client_for(store.url)
        self.key, self.holder, self.ttl_s = store.leader_key, holder, ttl_s
        self.token: int | None = None
        self._lease: int | None = None
        self._valid_until = 0.0  # monotonic time until which the lease is surely alive
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def _leader_exists(self) -> bool:
        reply = self.client.post(
            self.client.get_url("/kv/range"), json={"key": b64(self.key), "count_only": True}
        )
        return int(reply.get("count", 0)) > 0

    def _try_once(self) -> bool:
        if self._leader_exists():
            return False
        started = time.monotonic()
        lease = self.client.lease(self.ttl_s)
        reply = self.client.transaction(
            {
                "compare": [compare(self.key, "CREATE", 0)],
                "success": [put(self.key, self.holder, lease=lease.id)],
                "failure": [],
            }
        )
        if not reply.get("succeeded"):
            lease.revoke()
            return False
        self._lease, self.token = lease.id, int(reply["header"]["revision"])
        self._valid_until = started + self.ttl_s
        self._stop.clear()
        self._keeper = threading.Thread(target=self._keep_alive, name="lease-keeper", daemon=True)
        self._keeper.start()
        log.info("%s leads with token %d", self.holder, self.token)
        return True

    def campaign(self, timeout_s: float | None = None) -> bool:
        deadline = _deadline(timeout_s)
        while not self._try_once():
            if time.monotonic() + POLL_S > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def _keep_alive(self) -> None:
        """Renew the lease every TTL/3; after a failed renewal the leadership ends at the lease's
        last known expiry, whatever happens later (the store fences a late order anyway)."""
        while not self._stop.wait(self.ttl_s / 3):
            started = time.monotonic()
            try:
                ttl = int(
                    self.client.post(
                        self.client.get_url("/lease/keepalive"), json={"ID": self._lease}
                    )["result"].get("TTL", -1)
                )
            except Exception as err:  # any failure of the renewal is the same: not renewed
                log.warning("lease renewal failed: %r", err)
                continue
            if ttl <= 0:
                log.warning("%s lost its lease: no longer the leader", self.holder)
                self._valid_until = 0.0
                return
            self._valid_until = started + ttl

    @property
    def is_leader(self) -> bool:
        return self.token is not None and time.monotonic() < self._valid_until

    def resign(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join()
        if self._lease is not None:
            try:
                self.client.post(self.client.get_url("/kv/lease/revoke"), json={"ID": self._lease})
            except Etcd3Exception as err:  # gone already, or etcd unreachable: it expires anyway
                log.info("lease revoke at resign: %r", err)
        self._lease, self.token, self._valid_until = None, None, 0.0


class LockFileElection:
    """Leadership of the managers sharing one SQLite file: an exclusive lock on PATH.leader."""

    def __init__(self, store: SqliteStore, holder: str) -> None:
        self.store, self.holder = store, holder
        self.lock_path = f"{store.path}.leader"
        self.token: int | None = None
        self._fd: int | None = None

    def campaign(self, timeout_s: float | None = None) -> bool:
        deadline = _deadline(timeout_s)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() + POLL_S > deadline:
                    os.close(fd)
                    return False
                time.sleep(POLL_S)
        self._fd = fd
        self.token = self.store.claim_leadership(self.holder)
        log.info("%s leads with token %d", self.holder, self.token)
        return True

    @property
    def is_leader(self) -> bool:
        return self._fd is not None

    def resign(self) -> None:
        if self.token is not None:
            self.store.release_leadership(self.token)
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
        self._fd, self.token = None, None
