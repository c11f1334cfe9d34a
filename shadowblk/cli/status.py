"""`shadowblk status`: the state of the fleet, as the manager sees it, or of one replicated
primary, as its `shadowblk serve` publishes it in its state folder.

The fleet form asks a manager (--manager URL). The --state-dir form reads the status file a
running `shadowblk serve --shadow ...` refreshes twice a second (no manager needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from shadowblk.cli.fleet_text import size
from shadowblk.cli.output import emit, json_option
from shadowblk.cli.remote import with_client
from shadowblk.manager.client import Client

RECENT = 5  # switchovers shown


def _fleet(doc: dict[str, Any]) -> str:
    leader = doc["leader"]
    servers, volumes, cap = doc["servers"], doc["volumes"], doc["capacity"]
    role = "leader" if doc["manager"]["leading"] else "standby"
    lines = [
        f"manager   {doc['manager']['url']} ({role})",
        f"leader    {leader['holder']} (fencing token {leader['token']})" if leader else
        "leader    none",
        f"servers   {servers['total']}: {servers['up']} up, {servers['down']} down, "
        f"{servers['draining']} draining",
        f"volumes   {volumes['total']}, {len(volumes['degraded'])} degraded",
        f"capacity  {size(cap['total_bytes'])}, {size(cap['allocated_bytes'])} allocated, "
        f"{size(cap['used_bytes'])} used",
    ]  # fmt: skip
    if volumes["degraded"]:
        lines.append(f"degraded  {', '.join(volumes['degraded'])}")
    for r in doc.get("switchovers", []):
        pause = r.get("pause_seconds")
        took = f", pause {pause * 1000:.1f} ms" if pause is not None else ""
        kind = "planned" if r.get("planned") else "emergency"
        lines.append(
            f"switchover {r['volume']} {r.get('from', '?')} -> {r.get('to', '?')} "
            f"{r['outcome']} ({kind}{took}): {r.get('reason') or r.get('error', '')}"
        )
    return "\n".join(lines)


def _primary(doc: dict[str, Any]) -> str:
    fenced = "  FENCED" if doc["fenced"] else ""
    lines = [
        f"volume    {doc['volume_id']} at {doc['url']} (pid {doc['pid']}), mode {doc['mode']}, "
        f"generation {doc['generation']}{fenced}",
        f"epochs    last cut {doc['last_cut_epoch']}, {size(doc['lag_bytes'])} not yet shipped "
        "to every shadow",
    ]
    for s in doc["shadows"]:
        state = "in sync" if s["in_sync"] else f"{s['catch_up'] or 'catching up'}"
        if s["catch_up"] == "full-sync" and not s["in_sync"]:
            done, total = s["sync_progress"]
            state += f" {100 * done / total:.0f}%" if total else ""
        link = "connected" if s["connected"] else f"DISCONNECTED ({s['last_error'] or '-'})"
        lines.append(
            f"shadow    {s['address']}: {link}, {state}, acked epoch {s['acked_epoch']}, "
            f"lag {s['lag_seconds']:.1f} s / {size(s['lag_bytes'])}, "
            f"{size(int(s['throughput_bytes_per_s']))}/s"
        )
    return "\n".join(lines)


@click.command("status")
@json_option
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="A replicated `shadowblk serve`'s --state-dir: that primary's shadows, not the fleet.",
)
@with_client
def command(client: Client, as_json: bool, state_dir: Path | None) -> None:
    """The fleet: leader, servers up and down, degraded volumes, capacity. With --state-dir:
    one primary's shadows (connected, in sync or resyncing, lag, acknowledged epoch)."""
    if state_dir is None:
        recent = client.call("GET", "/v1/switchovers", limit=RECENT)["switchovers"]
        emit({**client.status(), "switchovers": recent}, as_json, _fleet)
        return
    from shadowblk.nbd.replication import StatusUnavailable, read_status

    try:
        doc = read_status(state_dir)
    except StatusUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    emit(doc, as_json, _primary)
