"""The one small interface every metadata store implements, and the errors it raises.

Two implementations keep the same contract (tests/unit/test_store_contract.py runs the same
tests against both): SQLite, embedded and the default, and etcd for several managers.
"""

from __future__ import annotations

from typing import Protocol

from shadowblk.manager.store.model import Event, LeaderInfo, Server, Volume


class StoreError(Exception):
    """Base of every error a store raises on purpose."""


class NotFound(StoreError):
    """The named server or volume does not exist."""


class GenerationConflict(StoreError):
    """A compare-and-swap on a volume's generation lost: another change won (I3)."""

    def __init__(self, volume: str, expected: int, actual: int | None) -> None:
        super().__init__(
            f"volume {volume!r}: expected generation {expected}, the store has {actual}; "
            "another change of primary won"
        )
        self.volume, self.expected, self.actual = volume, expected, actual


class StaleFence(StoreError):
    """An order carries a fencing token that is not the current leader's: refused."""

    def __init__(self, token: int | None, current: LeaderInfo | None) -> None:
        now = f"{current.holder} with token {current.token}" if current else "no leader"
        super().__init__(f"order with fencing token {token} refused: the leader is {now}")
        self.token, self.current = token, current


class DuplicateOrder(StoreError):
    """An order with this id was given already: an order is never given twice."""

    def __init__(self, order_id: str) -> None:
        super().__init__(f"order {order_id!r} was given already")
        self.order_id = order_id


class Store(Protocol):
    """Servers, volumes, generations, an append-only event log, and a revision to poll."""

    def put_server(self, server: Server) -> None: ...
    def get_server(self, name: str) -> Server: ...
    def list_servers(self) -> list[Server]: ...
    def delete_server(self, name: str) -> None: ...

    def create_volume(self, volume: Volume) -> None:
        """Add a new volume; StoreError if the name is taken."""

    def put_volume(self, volume: Volume) -> None:
        """Change a volume's other fields; its generation is kept as the store has it,
        so that only `set_volume_primary` can raise it."""

    def get_volume(self, name: str) -> Volume: ...
    def list_volumes(self) -> list[Volume]: ...
    def delete_volume(self, name: str) -> None: ...

    def set_volume_primary(self, name: str, new_primary: str, expected_generation: int) -> int:
        """Make NEW_PRIMARY the primary if the generation is still EXPECTED_GENERATION; return
        the new generation. The new primary leaves the shadows, the old one becomes a stale
        shadow, and a `switchover` event is appended, all in one transaction.
        Raises GenerationConflict when another change won."""

    def append_event(self, event: Event) -> int:
        """Append a record (not an order) to the log; return its sequence number."""

    def give_order(self, event: Event) -> int:
        """Append an order if `event.fence` is the current leader's token and its
        `order_id` is new; StaleFence or DuplicateOrder otherwise. Returns its seq."""

    def events(self, since: int = 0) -> list[Event]:
        """The log records with seq > SINCE, oldest first."""

    def leader(self) -> LeaderInfo | None:
        """The current leader as recorded by the leader election, if any."""

    def revision(self) -> int:
        """A counter that grows with every change: followers poll it to know when to re-read."""

    def close(self) -> None: ...
