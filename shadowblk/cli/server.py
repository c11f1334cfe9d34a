"""`shadowblk server`: the storage servers the manager knows, and their health."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from shadowblk.cli.fleet_text import size, table
from shadowblk.cli.output import emit, json_option
from shadowblk.cli.remote import with_client
from shadowblk.cli.switchover import SWITCHOVER_TIMEOUT_S, describe
from shadowblk.manager.client import Client


def _age(at: float) -> str:
    return f"{max(0.0, time.time() - at):.0f}s ago" if at else "never"


def _show(s: dict[str, Any]) -> str:
    lines = [
        f"server               {s['name']}",
        f"state                {s['state']} (last heartbeat {_age(s['last_heartbeat'])})",
        f"zone / rack          {s['zone']} / {s['rack']}",
        f"address / nbd        {s['address'] or '-'} / {s['nbd_address'] or '-'}",
        f"capacity             {size(s['capacity_bytes'])}",
        f"used / allocated     {size(s['used_bytes'])} / {size(s['allocated_bytes'])}",
        f"drive models         {', '.join(s['drive_models']) or '-'}",
        f"I/O load             {s['io_load']:.0%}",
        f"failure probability  {s['failure_probability']:.2f}",
    ]
    lines += [f"health {k:<13} {json.dumps(v)}" for k, v in sorted(s["health"].items())]
    return "\n".join(lines)


@click.group("server")
def command() -> None:
    """Storage servers: where volumes can live."""


@command.command("list")
@json_option
@with_client
def list_(client: Client, as_json: bool) -> None:
    """Every registered server."""
    emit(
        client.servers(),
        as_json,
        lambda ss: table(
            ["NAME", "STATE", "ZONE", "RACK", "CAPACITY", "USED", "ALLOCATED", "RISK", "HEARTBEAT"],
            [
                [s["name"], s["state"], s["zone"], s["rack"], size(s["capacity_bytes"]),
                 size(s["used_bytes"]), size(s["allocated_bytes"]),
                 f"{s['failure_probability']:.2f}", _age(s["last_heartbeat"])]
                for s in ss
            ],
        ),
    )  # fmt: skip


@command.command("show")
@click.argument("name")
@json_option
@with_client
def show(client: Client, name: str, as_json: bool) -> None:
    """One server and its last health report."""
    emit(client.server(name), as_json, _show)


@command.command("drain")
@click.argument("name")
@click.option("--reason", default="drain", show_default=True, help="Recorded with each move.")
@json_option
@with_client
def drain(client: Client, name: str, reason: str, as_json: bool) -> None:
    """Mark server NAME draining and switch every primary on it over to a shadow (planned)."""
    client.timeout_s = SWITCHOVER_TIMEOUT_S * 10  # one switchover after the other
    doc = client.call("POST", f"/v1/servers/{name}/drain", {"reason": reason})
    emit(
        doc,
        as_json,
        lambda d: "\n".join(describe(r) for r in d["switchovers"]) or f"no primary on {name}",
    )
    if any(r["outcome"] != "succeeded" for r in doc["switchovers"]):
        raise SystemExit(1)
