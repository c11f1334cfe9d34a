"""`shadowblk volume`: create, list, show, delete and unblock volumes through the manager."""

from __future__ import annotations

from typing import Any

import click

from shadowblk.cli.fleet_text import size, table
from shadowblk.cli.output import emit, json_option
from shadowblk.cli.remote import with_client
from shadowblk.cli.serve import parse_size
from shadowblk.manager.client import Client


def _shadows(volume: dict[str, Any]) -> str:
    return ", ".join(f"{s['server']} ({s['state']})" for s in volume["shadows"]) or "-"


def _show(volume: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"volume      {volume['name']}",
            f"size        {size(volume['size_bytes'])} ({volume['size_bytes']} bytes, "
            f"block {volume['block_size']})",
            f"mode        {volume['mode']}",
            f"primary     {volume['primary']}",
            f"shadows     {_shadows(volume)} (wanted {volume['shadows_wanted']})",
            f"generation  {volume['generation']}",
            *([f"BLOCKED     {volume['blocked']}"] if volume.get("blocked") else []),
        ]
    )


@click.group("volume")
def command() -> None:
    """Volumes: where their primary and shadows live."""


@command.command("create")
@click.argument("name")
@click.option(
    "--size",
    "size_bytes",
    required=True,
    callback=lambda _ctx, _param, text: parse_size(text),
    help="Size: bytes or 512M, 10G, 1T (rounded up to the block size).",
)
@click.option("--shadows", type=click.IntRange(0, 8), default=1, show_default=True)
@click.option("--mode", type=click.Choice(["async", "sync"]), default="async", show_default=True)
@click.option("--primary", default=None, help="The server for the primary [default: placed].")
@json_option
@with_client
def create(
    client: Client, name: str, size_bytes: int, shadows: int, mode: str, primary: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Create volume NAME: place its primary (unless --primary) and its shadows."""
    made = client.create_volume(
        name=name, size_bytes=size_bytes, shadows=shadows, mode=mode, primary=primary
    )

    def human(doc: dict[str, Any]) -> str:
        warnings = doc["placement"]["primary"]["warnings"] + doc["placement"]["shadows"]["warnings"]
        return "\n".join(
            [f"created {name}", _show(doc["volume"])] + [f"WARNING: {w}" for w in warnings]
        )

    emit(made, as_json, human)


@command.command("list")
@json_option
@with_client
def list_(client: Client, as_json: bool) -> None:
    """Every volume."""
    volumes = client.volumes()
    emit(
        volumes,
        as_json,
        lambda vs: table(
            ["NAME", "SIZE", "MODE", "PRIMARY", "SHADOWS", "GEN"],
            [
                [v["name"], size(v["size_bytes"]), v["mode"], v["primary"], _shadows(v),
                 v["generation"]]
                for v in vs
            ],
        ),
    )  # fmt: skip


@command.command("show")
@click.argument("name")
@json_option
@with_client
def show(client: Client, name: str, as_json: bool) -> None:
    """One volume."""
    emit(client.volume(name), as_json, _show)


@command.command("delete")
@click.argument("name")
@json_option
@with_client
def delete(client: Client, name: str, as_json: bool) -> None:
    """Delete volume NAME; its servers are ordered to drop their copies."""
    emit(client.delete_volume(name), as_json, lambda v: f"deleted {v['name']}")


@command.command("unblock")
@click.argument("name")
@json_option
@with_client
def unblock(client: Client, name: str, as_json: bool) -> None:
    """Clear the BLOCKED mark an aborted switchover left on volume NAME.

    A planned switchover aborts when the shadow's checksums of the dirtied blocks disagree
    with the old primary's and cannot be repaired; the volume then stays fenced, with no
    switchover, promotion or new shadow, until an operator decides. After checking the copies
    (`shadowblk scrub NAME`, docs/switchover.md), this keeps the manager's current primary and
    orders every server back to its role.
    """
    emit(client.unblock(name), as_json, lambda v: f"unblocked {v['name']}: primary {v['primary']}")
