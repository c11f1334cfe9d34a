"""`shadowblk placement explain`: why a volume's shadows go where they go."""

from __future__ import annotations

from typing import Any

import click

from shadowblk.cli.output import emit, json_option
from shadowblk.cli.remote import with_client
from shadowblk.manager.client import Client


@click.group("placement")
def command() -> None:
    """Shadow placement decisions."""


@command.command("explain")
@click.argument("volume")
@json_option
@with_client
def explain(client: Client, volume: str, as_json: bool) -> None:
    """Every server's verdict for VOLUME's shadows as the fleet is now, and the reasons."""

    def human(doc: dict[str, Any]) -> str:
        current = ", ".join(doc["current_shadows"]) or "none"
        return f"{doc['explanation']}\ncurrent shadows: {current}"

    emit(client.placement(volume), as_json, human)
