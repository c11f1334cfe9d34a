"""`shadowblk notify-device`: what the udev rule runs (through systemd-run) when a block device
tagged for shadowblk goes away: it hands the event to the local agent and ends at once."""

from __future__ import annotations

import json
from pathlib import Path

import click

from shadowblk.agent import notify


@click.command("notify-device")
@click.argument("action", type=click.Choice(["add", "change", "remove"]))
@click.argument("name")
@click.argument("devnode", required=False)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=notify.RUN_DIR,
    show_default=True,
    help="The agent's run folder (its agent.json) [env SHADOWBLK_RUN_DIR].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the agent's answer as JSON.")
def command(action: str, name: str, devnode: str | None, run_dir: Path, as_json: bool) -> None:
    """Tell the local agent that device NAME (sbk-VOLUME, udev's SHADOWBLK_NAME) at DEVNODE had
    ACTION. A removed device of a primary volume the agent hosts makes it ask the manager for
    that volume's emergency switchover; the agent answers before the switchover runs."""
    try:
        answer = notify.notify(run_dir, action, name, devnode)
    except notify.NotifyError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(answer))
    elif answer.get("emergency"):
        click.echo(f"{name}: emergency switchover requested")
    else:
        click.echo(f"{name}: noted (not a primary's loss here)")
