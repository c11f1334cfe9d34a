"""What the API does to the fleet: reads and changes of the store, placement, events, orders.

Plain synchronous code over a Store: the manager runs it on its one store thread, so the
changes of one manager never interleave (and only the leader changes anything). A change that
a server must act on is also an order in the log, fenced by the leader's token; an agent's
heartbeat collects the orders addressed to it.

Space on a server is what its agent reports as used or what the volumes placed on it take,
whichever is more: a volume placed a moment ago counts before the agent has written a byte.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

from shadowblk.manager.api_errors import ApiError
from shadowblk.manager.placement import Decision, Policy, decide, judge_all, pick, place
from shadowblk.manager.store import GenerationConflict, NotFound, Store
from shadowblk.manager.store.model import (
    Event,
    Mode,
    Server,
    ServerState,
    Shadow,
    ShadowState,
    Volume,
    switched,
)


class Refused(ApiError):
    """A well-formed request that the fleet as it is cannot satisfy (HTTP 404 or 409)."""


# what a heartbeat carries about the server's health, kept as sent (docs/monitoring.md)
HEALTH_KEYS = (
    "latency_ms",
    "io_errors",
    "smart",
    "latency_histogram",
    "checksum_discrepancies",
    "failure",
    "volumes",
    "hosted",
    "io_window",
)


def allocations(volumes: list[Volume], skip: str | None = None) -> Counter[str]:
    """Bytes placed on each server by VOLUMES (primary and shadows), leaving out SKIP."""
    placed: Counter[str] = Counter()
    for v in volumes:
        if v.name != skip:
            for server in (v.primary, *v.shadow_servers()):
                placed[server] += v.size_bytes
    return placed


def committed(servers: list[Server], placed: Counter[str]) -> list[Server]:
    """SERVERS with used bytes raised to what is placed on them, for placement."""
    return [dataclasses.replace(s, used_bytes=max(s.used_bytes, placed[s.name])) for s in servers]


def choose_primary(volume: Volume, servers: list[Server], policy: Policy) -> Decision:
    """The best server to hold VOLUME's primary, judged as a shadow with no primary to avoid."""
    probe = dataclasses.replace(volume, primary="", shadows=[], shadows_wanted=1)
    candidates = judge_all(probe, servers, policy)
    return decide(probe, candidates, pick(probe, candidates, servers))


def _rejections(decision: Decision) -> str:
    return "; ".join(f"{c.server}: {', '.join(c.reasons)}" for c in decision.candidates)


def aborted(record: dict[str, Any]) -> bool:
    """A switchover record whose checksum compare stopped the promotion (no copy to trust, or
    a repair that failed): nothing may promote the target, ever, without an operator."""
    result = (record.get("checksums") or {}).get("result")
    return record.get("outcome") == "aborted" or result in ("mismatch", "repair-failed")


def _unblocked(volume: Volume) -> Volume:
    """VOLUME, if no aborted switchover blocked it; else Refused (409)."""
    if volume.blocked:
        raise Refused(409, f"{volume.name} is blocked ({volume.blocked}): an operator decides "
                      "which copy to keep; nothing is promoted meanwhile")  # fmt: skip
    return volume


def round_up(size: int, block: int) -> int:
    return -(-size // block) * block


class Fleet:
    """The API's operations on one store."""

    def __init__(self, store: Store, policy: Policy | None = None, lease_s: float = 6.0) -> None:
        self.store, self.policy = store, policy or Policy()
        # the failure predictor (manager/risk.py): heartbeat -> its `failure` document
        self.assess: Callable[[str, dict[str, Any], float, Any], dict[str, Any]] | None = None
        self.lease_s = lease_s  # how long a heartbeat's answer lets a primary accept writes

    # reads
    def _server_view(self, server: Server, placed: Counter[str]) -> dict[str, Any]:
        return {**server.to_dict(), "allocated_bytes": placed[server.name]}

    def servers(self) -> list[dict[str, Any]]:
        placed = allocations(self.store.list_volumes())
        return [self._server_view(s, placed) for s in self.store.list_servers()]

    def server(self, name: str) -> dict[str, Any]:
        server = self.store.get_server(name)
        return self._server_view(server, allocations(self.store.list_volumes()))

    def volumes(self) -> list[dict[str, Any]]:
        return [v.to_dict() for v in self.store.list_volumes()]

    def volume(self, name: str) -> dict[str, Any]:
        return self.store.get_volume(name).to_dict()

    def explain(self, name: str) -> dict[str, Any]:
        """Where NAME's shadows would go now (its own space not counted against it), and why."""
        volume = self.store.get_volume(name)
        placed = allocations(self.store.list_volumes(), skip=name)
        placed[volume.primary] += volume.size_bytes
        decision = place(
            dataclasses.replace(volume, shadows=[]),
            committed(self.store.list_servers(), placed),
            self.policy,
        )
        return {
            "decision": decision.to_dict(),
            "current_shadows": volume.shadow_servers(),
            "explanation": decision.explain(),
        }

    def events(self, since: int, limit: int) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.store.events(since)[:limit]]

    def status(self) -> dict[str, Any]:
        servers, volumes = self.store.list_servers(), self.store.list_volumes()
        states = Counter(s.state.value for s in servers)
        up = {s.name for s in servers if s.state is ServerState.UP}
        degraded = [
            v.name
            for v in volumes
            if v.primary not in up
            or sum(s.server in up and s.state is not ShadowState.STALE for s in v.shadows)
            < v.shadows_wanted
        ]
        placed = allocations(volumes)
        leader = self.store.leader()
        return {
            "leader": dataclasses.asdict(leader) if leader else None,
            "servers": {
                "total": len(servers),
                **{st.value: states[st.value] for st in ServerState},
            },
            "volumes": {"total": len(volumes), "degraded": degraded},
            "capacity": {
                "total_bytes": sum(s.capacity_bytes for s in servers),
                "used_bytes": sum(s.used_bytes for s in servers),
                "allocated_bytes": sum(placed.values()),
            },
        }

    # changes: only the leader calls these, with its fencing token
    def register(self, body: dict[str, Any], now: float) -> dict[str, Any]:
        """Add a server or refresh what its agent says about it; it is up from now on."""
        try:
            before: Server | None = self.store.get_server(body["name"])
        except NotFound:
            before = None
        server = Server(
            name=body["name"],
            zone=body["zone"],
            rack=body["rack"],
            address=body.get("address", ""),
            nbd_address=body.get("nbd_address", ""),
            control_address=body.get("control_address", ""),
            verify_address=body.get("verify_address", ""),
            capacity_bytes=body["capacity_bytes"],
            drive_models=body.get("drive_models", []),
            last_heartbeat=now,
        )
        if before is not None:
            server.used_bytes, server.io_load = before.used_bytes, before.io_load
            server.failure_probability, server.health = before.failure_probability, before.health
            if before.state is ServerState.DRAINING:
                server.state = ServerState.DRAINING
        self.store.put_server(server)
        self.store.append_event(
            Event("server-registered", server.name, {"zone": server.zone, "rack": server.rack})
        )
        return self.server(server.name)

    def heartbeat(self, name: str, body: dict[str, Any], now: float) -> dict[str, Any]:
        """Record a server's health; answer with its orders given after `orders_since`."""
        try:
            server = self.store.get_server(name)
        except NotFound:
            raise NotFound(
                f"no server {name!r}: an agent registers before its heartbeats"
            ) from None
        server.used_bytes = body["used_bytes"]
        server.io_load = body.get("io_load", server.io_load)
        if self.assess is not None:
            stored = server.health.get("failure")  # the last verdict, maybe another leader's
            body = {**body, "failure": self.assess(name, body, now, stored)}
        server.health = {k: body[k] for k in HEALTH_KEYS if k in body}
        if "failure" in body:
            server.failure_probability = body["failure"]["probability"]
        server.last_heartbeat = now
        if server.state is ServerState.DOWN:
            server.state = ServerState.UP
            self.store.append_event(Event("server-up", name, {"reason": "heartbeat"}))
        self.store.put_server(server)
        self._shadow_states(name, server.health.get("hosted") or {})
        orders = [
            e.to_dict()
            for e in self.store.events(body.get("orders_since", 0))
            if e.order_id is not None and e.detail.get("server") == name
        ]
        leases = {
            v.name: v.generation
            for v in self.store.list_volumes()
            if v.primary == name and not v.blocked  # blocked: its store primary never opened
        }
        return {
            "server": self.server(name),
            "orders": orders,
            "leases": leases,
            "lease_s": self.lease_s,
        }

    def _shadow_states(self, name: str, hosted: dict[str, Any]) -> None:
        """Follow the shadows' states as the primary NAME's shipper reports them: in step, or
        catching up (a stale shadow stays stale until it is in step again)."""
        addresses = {s.name: s.address for s in self.store.list_servers()}
        for vname, entry in hosted.items():
            seen = entry.get("shadows")
            if entry.get("role") != "primary" or not seen:
                continue
            try:
                volume = self.store.get_volume(vname)
            except NotFound:
                continue
            if volume.primary != name or entry.get("generation") != volume.generation:
                continue
            changed = False
            for shadow in volume.shadows:
                report = seen.get(addresses.get(shadow.server, ""))
                if report is None:
                    continue
                if report["in_sync"]:
                    state = ShadowState.IN_SYNC
                else:
                    state = (
                        ShadowState.STALE
                        if shadow.state is ShadowState.STALE
                        else ShadowState.SYNCING
                    )
                if state is not shadow.state:
                    shadow.state, changed = state, True
            if changed:
                self.store.put_volume(volume)

    def create_volume(self, body: dict[str, Any], fence: int) -> dict[str, Any]:
        """Place, persist, log and order a new volume; Refused if it cannot be placed."""
        block = body.get("block_size", 4096)
        size = round_up(body["size_bytes"], block)  # the document's maximum keeps it in int64
        volume = Volume(
            name=body["name"],
            size_bytes=size,
            primary=body.get("primary", ""),
            block_size=block,
            mode=Mode(body.get("mode", "async")),
            shadows_wanted=body.get("shadows", 1),
        )
        servers = self.store.list_servers()
        fleet = committed(servers, allocations(self.store.list_volumes()))
        primary = self._primary(volume, fleet)
        volume.primary = primary.chosen[0]
        shadows = place(volume, fleet, self.policy)
        if shadows.unfilled:
            raise Refused(
                409,
                f"only {len(shadows.chosen)} of {volume.shadows_wanted} shadow(s) of "
                f"{volume.name} can be placed: {_rejections(shadows)}",
                shadows.to_dict(),
            )
        volume.shadows = [Shadow(s) for s in shadows.chosen]
        self.store.create_volume(volume)
        seq = self.store.append_event(
            Event("volume-created", volume.name, {"primary": volume.primary,
                                                   "shadows": shadows.chosen})
        )  # fmt: skip
        roles = [(volume.primary, "primary")] + [(s, "shadow") for s in shadows.chosen]
        self._order("host-volume", volume, seq, roles, fence)
        return {
            "volume": volume.to_dict(),
            "placement": {"primary": primary.to_dict(), "shadows": shadows.to_dict()},
        }

    def _primary(self, volume: Volume, fleet: list[Server]) -> Decision:
        """The decision for the primary: the one asked for, if it can take it, or the best."""
        if volume.primary:
            asked = next((s for s in fleet if s.name == volume.primary), None)
            if asked is None:
                raise Refused(404, f"primary: no server {volume.primary!r} is registered")
            fleet = [asked]
        decision = choose_primary(volume, fleet, self.policy)
        if decision.unfilled:
            raise Refused(
                409,
                f"no server can hold the primary of {volume.name}: {_rejections(decision)}",
                decision.to_dict(),
            )
        return decision

    def delete_volume(self, name: str, fence: int) -> dict[str, Any]:
        """Forget a volume and order every server that holds a copy to drop it."""
        volume = self.store.get_volume(name)
        self.store.delete_volume(name)
        seq = self.store.append_event(Event("volume-deleted", name, {"primary": volume.primary}))
        roles = [(volume.primary, "primary")] + [(s, "shadow") for s in volume.shadow_servers()]
        self._order("drop-volume", volume, seq, roles, fence)
        return volume.to_dict()

    def _order(
        self, kind: str, volume: Volume, seq: int, roles: list[tuple[str, str]], fence: int
    ) -> None:
        """One fenced order per server; ids derive from the event, so none is given twice."""
        for server, role in roles:
            self.store.give_order(
                Event(
                    kind,
                    volume.name,
                    {"server": server, "role": role, "volume": volume.to_dict()},
                    order_id=f"{kind}-{volume.name}-{seq}-{server}",
                    fence=fence,
                )
            )

    def report_switchover(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Log how a switchover of volume NAME ended (the event the dashboard and alerts read)."""
        self.store.get_volume(name)  # NotFound: a 404 for a volume never created
        event = Event("switchover-result", name, body)
        event.seq = self.store.append_event(event)
        return event.to_dict()

    def mark_silent_down(self, timeout_s: float, now: float) -> list[str]:
        """Mark down every up server whose last heartbeat is older than TIMEOUT_S."""
        down = []
        for server in self.store.list_servers():
            silent = now - server.last_heartbeat
            if server.state is ServerState.UP and silent > timeout_s:
                server.state = ServerState.DOWN
                self.store.put_server(server)
                self.store.append_event(
                    Event("server-down", server.name, {"silent_s": round(silent, 1)})
                )
                down.append(server.name)
        return down

    def next_silence(self, timeout_s: float, now: float) -> float | None:
        """Seconds from NOW until the first up server's last heartbeat is TIMEOUT_S old (None:
        no server is up), so that the watch marks it down then rather than at its next round."""
        ups = [s.last_heartbeat for s in self.store.list_servers() if s.state is ServerState.UP]
        return min(ups) + timeout_s - now if ups else None

    # switchovers (the steps between them run in manager/switchover.py, off this thread)
    def plan_switchover(self, name: str, to: str | None) -> dict[str, Any]:
        """Who hands VOLUME over to whom, and how to reach them; Refused if it cannot be now."""
        volume = _unblocked(self.store.get_volume(name))
        servers = {s.name: s for s in self.store.list_servers()}
        old = servers.get(volume.primary)
        if old is None or old.state is ServerState.DOWN or not old.control_address:
            raise Refused(
                409,
                f"{name}: its primary {volume.primary} is not up with a control address: "
                "an emergency switchover takes over when it times out",
            )
        target = self._target(volume, servers, to, in_step=True)
        return {"volume": volume.to_dict(), "from": old.name, "to": target.name,
                "from_control": old.control_address, "to_control": target.control_address,
                "after": switched(volume, target.name)[0].to_dict()}  # fmt: skip

    def _target(
        self, volume: Volume, servers: dict[str, Server], to: str | None, in_step: bool
    ) -> Server:
        """TO if it holds a usable shadow of VOLUME, else the up shadow at the highest epoch.
        IN_STEP (planned): only a shadow the primary reports in step; otherwise (emergency) any
        that is not stale."""
        usable = []
        for shadow in volume.shadows:
            server = servers.get(shadow.server)
            report = (server.health.get("hosted") or {}).get(volume.name, {}) if server else {}
            if (
                server is not None
                and server.state is not ServerState.DOWN
                and (server.state is ServerState.UP or not in_step)  # planned: not draining
                and server.control_address
                and shadow.state is not ShadowState.STALE
                and (shadow.state is ShadowState.IN_SYNC or not in_step)
                and report.get("role") == "shadow"
                and report.get("generation") == volume.generation
                and report.get("epoch", 0) > 0
            ):
                usable.append((report["epoch"], server))
        if to is not None:
            if to not in servers:
                raise Refused(404, f"to: no server {to!r} is registered")
            chosen = [s for _, s in usable if s.name == to]
            if not chosen:
                raise Refused(409, f"{to} holds no shadow of {volume.name} that can be promoted "
                              "now (up, in step, at the current generation)")  # fmt: skip
            return chosen[0]
        if not usable:
            raise Refused(409, f"{volume.name} has no shadow that can be promoted now (up, in "
                          "step, at the current generation, with an applied epoch)")  # fmt: skip
        return max(usable, key=lambda pair: pair[0])[1]

    def raise_generation(self, name: str, target: str, expected: int) -> dict[str, Any]:
        """The compare-and-swap of I3: TARGET becomes the primary; 409 if another change won."""
        try:
            self.store.set_volume_primary(name, target, expected)
        except GenerationConflict as err:
            raise Refused(409, str(err)) from None
        return self.store.get_volume(name).to_dict()

    def orphaned(self) -> list[str]:
        """The volumes whose primary's server is down."""
        down = {s.name for s in self.store.list_servers() if s.state is ServerState.DOWN}
        return [v.name for v in self.store.list_volumes() if v.primary in down]

    def plan_emergency(self, name: str) -> dict[str, Any] | None:
        """VOLUME's takeover plan if its primary's server is down (Refused: no shadow can, or
        the volume is blocked)."""
        volume = _unblocked(self.store.get_volume(name))
        servers = {s.name: s for s in self.store.list_servers()}
        old = servers.get(volume.primary)
        if old is None or old.state is not ServerState.DOWN:
            return None
        target = self._target(volume, servers, None, in_step=False)
        return {
            "volume": volume.to_dict(),
            "from": old.name,
            "to": target.name,
            "to_control": target.control_address,
            "silent_since": old.last_heartbeat,
            "after": switched(volume, target.name)[0].to_dict(),
        }

    def plan_lost(self, name: str, server: str) -> dict[str, Any]:
        """VOLUME's takeover plan when its primary reports the volume's device gone (the agent
        is alive, the volume is not): Refused if SERVER (the reporter) is not its primary any
        more (a late or repeated report must not move the new primary), no shadow can be
        promoted, or the volume is blocked."""
        volume = _unblocked(self.store.get_volume(name))
        if server != volume.primary:
            raise Refused(409, f"{name}: its primary is {volume.primary}, not {server}: nothing "
                          "to take over")  # fmt: skip
        servers = {s.name: s for s in self.store.list_servers()}
        old = servers.get(volume.primary)
        target = self._target(volume, servers, None, in_step=False)
        return {
            "volume": volume.to_dict(),
            "from": volume.primary,
            "to": target.name,
            "from_control": old.control_address if old else "",
            "to_control": target.control_address,
            "after": switched(volume, target.name)[0].to_dict(),
        }

    def drop_lost_copy(self, name: str, server: str) -> None:
        """Forget SERVER's copy of volume NAME (the old primary, demoted to a stale shadow by
        the CAS): its device is gone, so it is no shadow. Replenish (manager/replenish.py)
        places a new one, and no order tells SERVER to host the volume again."""
        volume = self.store.get_volume(name)
        if server in volume.shadow_servers() and server != volume.primary:
            volume.shadows = [s for s in volume.shadows if s.server != server]
            self.store.put_volume(volume)
            detail = {"server": server, "reason": "its device is gone"}
            self.store.append_event(Event("shadow-lost", name, detail))

    def take_over(
        self, name: str, target: str, expected: int, silent_since: float
    ) -> dict[str, Any]:
        """Raise the generation for TARGET only if the old primary's server is still silent
        since SILENT_SINCE: a heartbeat meanwhile renewed its lease, and it keeps the volume."""
        volume = self.store.get_volume(name)
        old = self.store.get_server(volume.primary)
        if old.state is not ServerState.DOWN or old.last_heartbeat != silent_since:
            raise Refused(409, f"{volume.primary} answered again: {name} stays where it is")
        return self.raise_generation(name, target, expected)

    def finish_switchover(self, record: dict[str, Any], fence: int) -> dict[str, Any]:
        """Order every server of the volume to its new role (the same decision the switchover
        carried out, for an agent that missed it), and record how it went."""
        volume = self.store.get_volume(record["volume"])
        event = Event("switchover-result", volume.name, record)
        event.seq = self.store.append_event(event)
        moved = (volume.primary, volume.generation) == (record["to"], record.get("generation"))
        if aborted(record):  # no copy to trust: blocked (no order, nothing promotes it)
            volume.blocked = f"switchover to {record['to']} aborted: {record.get('error', '')}"
            self.store.put_volume(volume)
        elif moved and not volume.blocked:
            roles = [(volume.primary, "primary")]
            roles += [(s, "shadow") for s in volume.shadow_servers()]
            self._order("host-volume", volume, event.seq, roles, fence)
        return event.to_dict()

    def unblock(self, name: str, fence: int) -> dict[str, Any]:
        """The operator's decision after an aborted switchover: the store's primary (the
        compare's target, at the raised generation) is the volume's copy after all; every
        server is ordered to its role as the store says."""
        volume = self.store.get_volume(name)
        if not volume.blocked:
            raise Refused(409, f"{name} is not blocked")
        reason, volume.blocked = volume.blocked, ""
        self.store.put_volume(volume)
        seq = self.store.append_event(Event("volume-unblocked", name, {"was": reason}))
        roles = [(volume.primary, "primary")] + [(s, "shadow") for s in volume.shadow_servers()]
        self._order("host-volume", volume, seq, roles, fence)
        return volume.to_dict()

    def switchovers(self, volume: str | None, limit: int) -> list[dict[str, Any]]:
        """The latest LIMIT switchover records (of VOLUME), newest last."""
        found = [
            {**e.detail, "seq": e.seq, "at": e.at}
            for e in self.store.events(0)
            if e.kind == "switchover-result" and volume in (None, e.subject)
            and "volume" in e.detail
        ]  # fmt: skip
        return found[-limit:]

    def primaries_on(self, name: str) -> list[str]:
        """The volumes whose primary SERVER holds (what draining it moves away)."""
        self.store.get_server(name)
        return [v.name for v in self.store.list_volumes() if v.primary == name]

    def set_draining(self, name: str) -> None:
        server = self.store.get_server(name)
        if server.state is not ServerState.DRAINING:
            server.state = ServerState.DRAINING
            self.store.put_server(server)
            self.store.append_event(Event("server-draining", name, {}))

    def attach(self, name: str, control_url: str) -> dict[str, Any]:
        """Remember an `attach` router of VOLUME, so switchovers repoint it at once."""
        volume = self.store.get_volume(name)
        if control_url not in volume.attachments:
            volume.attachments.append(control_url)
            self.store.put_volume(volume)
        return volume.to_dict()

    def detach(self, name: str, control_url: str) -> None:
        """Forget an `attach` router that no longer answers."""
        volume = self.store.get_volume(name)
        if control_url in volume.attachments:
            volume.attachments.remove(control_url)
            self.store.put_volume(volume)
