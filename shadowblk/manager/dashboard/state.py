"""The dashboard's document: a FleetView and the active alerts as plain JSON for the page."""

from __future__ import annotations

from typing import Any

from shadowblk.manager.alerts.engine import Notification
from shadowblk.manager.dashboard.view import FleetView
from shadowblk.manager.store.model import ServerState, Volume

IN_SERVICE = ("in_sync", "syncing")


def _shadows(view: FleetView, v: Volume) -> list[dict[str, Any]]:
    reported = view.volume_health(v).get("shadows", {})
    out = []
    for shadow in v.shadows:
        r = reported.get(shadow.server, {})
        state = "server down" if not view.up(shadow.server) else r.get("state", shadow.state)
        if shadow.state.value == "stale":
            state = "stale"
        out.append(
            {
                "server": shadow.server,
                "state": state,
                "lag_seconds": r.get("lag_seconds"),
                "lag_bytes": r.get("lag_bytes"),
            }
        )
    return out


def _volume(view: FleetView, v: Volume) -> dict[str, Any]:
    h = view.volume_health(v)
    shadows = _shadows(view, v)
    in_service = sum(s["state"] in IN_SERVICE for s in shadows)
    health = (
        "primary down"
        if not view.up(v.primary)
        else "degraded"
        if in_service < v.shadows_wanted
        else "ok"
    )
    return {
        "name": v.name,
        "primary": v.primary,
        "mode": v.mode.value,
        "generation": v.generation,
        "health": health,
        "written_bytes": h.get("written_bytes"),
        "dirty_bytes": h.get("dirty_bytes"),
        "epoch": h.get("epoch"),
        "shadows": shadows,
    }


def document(view: FleetView, alerts: list[Notification], leading: bool) -> dict[str, Any]:
    """Everything the page shows, at VIEW's moment."""
    return {
        "at": view.at,
        "leading": leading,
        "servers": [
            {
                "name": s.name,
                "zone": s.zone,
                "rack": s.rack,
                "state": s.state.value,
                "down": s.state is ServerState.DOWN,
                "failure_probability": s.failure_probability,
                "failure_reasons": (s.health.get("failure") or {}).get("reasons", []),
                "failure_level": (s.health.get("failure") or {}).get("level"),
                "failure_trigger": ((s.health.get("failure") or {}).get("trigger") or {}).get(
                    "state"
                ),
                "latency_ms": s.health.get("latency_ms", {}),
                "io_errors": s.health.get("io_errors", 0),
                "checksum_discrepancies": s.health.get("checksum_discrepancies", 0),
                "heartbeat_age_s": round(view.at - s.last_heartbeat, 1),
            }
            for s in view.servers
        ],
        "volumes": [_volume(view, v) for v in view.volumes],
        "switchovers": [
            {"seq": e.seq, "at": e.at, "kind": e.kind, "volume": e.subject, "detail": e.detail}
            for e in view.switchovers
        ],
        "alerts": [
            {
                "name": n.alert.name,
                "severity": n.alert.severity,
                "labels": dict(n.alert.labels),
                "summary": n.alert.summary,
                "description": n.alert.description,
                "starts_at": n.starts_at,
            }
            for n in alerts
        ],
    }
