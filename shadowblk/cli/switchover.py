"""`shadowblk switchover VOLUME`: planned switchover of a volume to one of its shadows."""

from __future__ import annotations

from typing import Any

import click

from shadowblk.cli.output import emit, json_option
from shadowblk.cli.remote import with_client
from shadowblk.manager.client import Client

SWITCHOVER_TIMEOUT_S = 300.0  # it waits for a standby `serve` to load and the old primary to stop


def describe(r: dict[str, Any]) -> str:
    """One switchover record as an operator reads it: who, why, the pause, each step's time."""
    if r["outcome"] != "succeeded":
        return f"{r['volume']}: switchover {r['outcome']}: {r.get('error', '-')}"
    pause = r.get("pause_seconds")
    lines = [
        f"{r['volume']}: {r['from']} -> {r['to']} (generation {r['generation']}, "
        f"reason: {r.get('reason') or '-'})",
        f"  pause           {pause * 1000:.1f} ms" if pause is not None else "  pause   -",
        f"  last delta      {r.get('delta_bytes', 0)} bytes, shadow at epoch {r.get('epoch')}",
        f"  old primary     {r.get('old_primary', '-')}",
        f"  endpoint        {r.get('endpoint', '-')} ({r.get('attachments', 0)} attach repointed)",
    ]
    if checks := r.get("checksums"):
        lines.append(f"  checksums       {checks_line(checks)}")
    if r.get("router_pause_ms") is not None:
        lines.append(f"  router pause    {r['router_pause_ms']:.1f} ms (requests held at attach)")
    lines += [f"  {step:<15} {ms:.1f} ms" for step, ms in r.get("timings_ms", {}).items()]
    return "\n".join(lines)


def checks_line(c: dict[str, Any]) -> str:
    """The compare before the promotion, in one line (docs/switchover.md)."""
    if "blocks_compared" not in c:
        return f"{c.get('result')}: {c.get('error', '-')}"
    line = f"{c['result']}: {c['blocks_compared']} dirty blocks compared ({c['scope']})"
    if c.get("mismatched"):
        line += f", {len(c['mismatched'])} differed, {c.get('repaired', 0)} repaired"
    return line


@click.command("switchover")
@click.argument("volume")
@click.option("--to", "to", default=None, help="The shadow's server [default: the best in step].")
@click.option("--reason", default="operator", show_default=True, help="Recorded with it.")
@json_option
@with_client
def command(client: Client, volume: str, to: str | None, reason: str, as_json: bool) -> None:
    """Move VOLUME's primary to a shadow without an error for the VM: fence the primary, ship
    its last epoch, promote the shadow, repoint attach. Prints the timings of each step."""
    client.timeout_s = SWITCHOVER_TIMEOUT_S
    body: dict[str, Any] = {"reason": reason}
    if to is not None:
        body["to"] = to
    emit(client.call("POST", f"/v1/volumes/{volume}/switchover", body), as_json, describe)
