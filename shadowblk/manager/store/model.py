"""The metadata the manager keeps: servers, volumes with their shadows, and events.

Plain dataclasses with a JSON round trip, so that every store keeps the same documents and
a field added later (with a default) still reads records written before it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self


class ServerState(StrEnum):
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"


class ShadowState(StrEnum):
    SYNCING = "syncing"  # initial full sync or resync from the bitmap under way
    IN_SYNC = "in_sync"  # follows the primary within the mode's budget
    STALE = "stale"  # behind or disconnected: needs a resync before it can be promoted


class Mode(StrEnum):
    ASYNC = "async"
    SYNC = "sync"


class _Doc:
    """JSON round trip shared by the records; unknown keys are ignored for forward compatibility."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Server(_Doc):
    """A storage server that hosts primaries and shadows."""

    name: str
    zone: str
    rack: str
    address: str = ""  # the agent's control address, host:port
    nbd_address: str = ""  # where its NBD exports are served, host:port
    control_address: str = ""  # the agent's switchover calls, host:port (agent/control.py)
    verify_address: str = ""  # its shadows' verify port, host:port (scrub, verify)
    capacity_bytes: int = 0
    used_bytes: int = 0
    drive_models: list[str] = field(default_factory=list)
    failure_probability: float = 0.0  # the predictor's latest score, 0..1
    io_load: float = 0.0  # share of the server's I/O capacity in use, 0..1
    state: ServerState = ServerState.UP
    last_heartbeat: float = 0.0  # unix time
    health: dict[str, Any] = field(default_factory=dict)  # the agent's last report, as sent

    def __post_init__(self) -> None:
        self.state = ServerState(self.state)

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)


@dataclass
class Shadow(_Doc):
    """One shadow of a volume: where it lives and how far it is."""

    server: str
    state: ShadowState = ShadowState.SYNCING

    def __post_init__(self) -> None:
        self.state = ShadowState(self.state)


@dataclass
class Volume(_Doc):
    """A primary volume and its shadows; `generation` fences old primaries (I3)."""

    name: str
    size_bytes: int
    primary: str
    block_size: int = 4096
    mode: Mode = Mode.ASYNC
    shadows_wanted: int = 1
    shadows: list[Shadow] = field(default_factory=list)
    generation: int = 1
    attachments: list[str] = field(default_factory=list)  # control URLs of `attach` routers
    blocked: str = ""  # why no copy may be promoted until an operator decides (an aborted compare)

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)
        self.shadows = [s if isinstance(s, Shadow) else Shadow.from_dict(s) for s in self.shadows]

    def shadow_servers(self) -> list[str]:
        return [s.server for s in self.shadows]


@dataclass
class Event(_Doc):
    """One record of the append-only log: a switchover, an order, a state change.

    An order has an `order_id` (the same decision always gets the same id, so a second leader
    re-deciding it is refused) and the `fence` token of the leader that gave it.
    """

    kind: str
    subject: str  # the volume or server it is about
    detail: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)
    order_id: str | None = None
    fence: int | None = None
    seq: int = 0  # given by the store when appended; increases with every append


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads the managers now, and the fencing token its orders must carry."""

    holder: str
    token: int


def switched(volume: Volume, new_primary: str) -> tuple[Volume, Event]:
    """VOLUME with NEW_PRIMARY as primary and the generation raised, plus the event saying so.

    The new primary leaves the shadows; the old primary stays as a stale shadow, to be resynced
    from its bitmap (or retired) by the orchestrator. Both stores call this inside their
    compare-and-swap, so the rule is written once.
    """
    old = volume.primary
    shadows = [s for s in volume.shadows if s.server not in (new_primary, old)]
    if old != new_primary:
        shadows.append(Shadow(old, ShadowState.STALE))
    after = dataclasses.replace(
        volume, primary=new_primary, shadows=shadows, generation=volume.generation + 1
    )
    event = Event(
        kind="switchover",
        subject=volume.name,
        detail={"from": old, "to": new_primary, "generation": after.generation},
    )
    return after, event
