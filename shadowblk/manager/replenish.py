"""A new shadow where a volume has fewer live shadows than it wants (docs/switchover.md).

A shadow is lost when its server has been down (no heartbeat for the heartbeat timeout) for
REPLACE_AFTER_S more: after an emergency switchover the old primary is such a shadow, and so is
any shadow whose server died. A volume whose primary is up and that has fewer shadows on
servers not down than `shadows_wanted` gets new ones, chosen by the placement code
(manager/placement.py) among the servers that are up; each new shadow replaces a lost one in
the volume's list (the lost copy is ordered dropped: its server drops it when it comes back).
The primary and the new shadow get `host-volume` orders: the primary's `serve` starts again
with the new shadow list and ships to it (a full initial sync: the new server has no copy).

A volume blocked by an aborted switchover (its store primary is the copy the checksum compare
rejected, its old primary a fenced stale shadow) is left alone: ordering its primary would
promote the rejected copy.

Runs on the leader, from the heartbeat watch, under each volume's switchover lock (never in the
middle of a switchover of that volume).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from shadowblk.manager.placement import place
from shadowblk.manager.service import Fleet, allocations, committed
from shadowblk.manager.store.model import Event, Server, ServerState, Shadow, Volume

log = logging.getLogger(__name__)

REPLACE_AFTER_S = 5.0  # beyond the heartbeat timeout: a quick restart is resynced, not replaced
_said: dict[str, str] = {}  # volume -> why no shadow could be placed, said once


def _lost(volume: Volume, servers: dict[str, Server], silent_s: float, now: float) -> list[str]:
    """VOLUME's shadow servers that have been down for longer than SILENT_S + REPLACE_AFTER_S."""
    lost = []
    for name in volume.shadow_servers():
        server = servers.get(name)
        if server is None or (
            server.state is ServerState.DOWN
            and now - server.last_heartbeat > silent_s + REPLACE_AFTER_S
        ):
            lost.append(name)
    return lost


def short(fleet: Fleet, silent_s: float, now: float) -> list[str]:
    """The volumes with an up primary and fewer live shadows than they want."""
    servers = {s.name: s for s in fleet.store.list_servers()}
    found = []
    for volume in fleet.store.list_volumes():
        primary = servers.get(volume.primary)
        if primary is None or primary.state is ServerState.DOWN or volume.blocked:
            continue  # an emergency switchover comes first; blocked: an operator does
        live = len(volume.shadows) - len(_lost(volume, servers, silent_s, now))
        if live < volume.shadows_wanted:
            found.append(volume.name)
    return found


def replace_lost(
    fleet: Fleet, name: str, silent_s: float, now: float, fence: int
) -> dict[str, Any] | None:
    """Place NAME's missing shadows and order them; the placement event's detail (None: nothing
    to do, or no server can take one: the decision is logged for the operator)."""
    store = fleet.store
    volume = store.get_volume(name)
    server_list = store.list_servers()
    servers = {s.name: s for s in server_list}
    primary = servers.get(volume.primary)
    if primary is None or primary.state is ServerState.DOWN or volume.blocked:
        return None  # blocked: its store primary was never promoted (an aborted switchover)
    lost = _lost(volume, servers, silent_s, now)
    live = [s for s in volume.shadows if s.server not in lost]
    if len(live) >= volume.shadows_wanted:
        return None
    probe = dataclasses.replace(volume, shadows=live)
    decision = place(probe, committed(server_list, allocations(store.list_volumes())), fleet.policy)
    if not decision.chosen:
        if _said.get(name) != (said := decision.explain()):  # said once, not every round
            log.warning("%s has %d of %d shadows and none can be placed:\n%s", name, len(live),
                        volume.shadows_wanted, said)  # fmt: skip
            _said[name] = said
        return None
    _said.pop(name, None)
    replaced = lost[: len(decision.chosen)]
    kept = [s for s in volume.shadows if s.server not in replaced]
    placed = [Shadow(c) for c in decision.chosen]
    volume.shadows = kept + placed
    store.put_volume(volume)
    detail = {"placed": decision.chosen, "replaced": replaced, "primary": volume.primary,
              "explanation": decision.explain()}  # fmt: skip
    seq = store.append_event(Event("shadow-placed", name, detail))
    roles = [(volume.primary, "primary")] + [(c, "shadow") for c in decision.chosen]
    fleet._order("host-volume", volume, seq, roles, fence)
    fleet._order("drop-volume", volume, seq, [(s, "shadow") for s in replaced], fence)
    log.warning("%s: new shadow(s) %s placed (replacing %s)", name, decision.chosen, replaced)
    return detail
