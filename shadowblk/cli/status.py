"""`shadowblk status`: the state of the fleet, as the manager sees it.

The fleet form asks a manager (--manager URL). A single primary's status read from its state
directory is a separate source that renders its own document; it adds a --state-dir branch here.
"""

from __future__ import annotations

from typing import Any

import click

from shadowblk.cli.fleet_text import size
from shadowblk.cli.output import emit, json_option
from shadowblk.cli.remote import with_client
from shadowblk.manager.client import Client


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
    return "\n".join(lines)


@click.command("status")
@json_option
@with_client
def command(client: Client, as_json: bool) -> None:
    """The fleet: leader, servers up and down, degraded volumes, capacity."""
    emit(client.status(), as_json, _fleet)
