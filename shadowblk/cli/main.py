"""The `shadowblk` command: the group and the table of every command module.

Each command lives in `shadowblk/cli/<module>.py` and exposes `command`. The group imports a
module only when its command runs (or `--help` lists it), so one command does not pay for the
imports of all the others: a daemon's start-up and a script's call stay quick.
"""

import importlib
import logging

import click

import shadowblk

# command name -> module in shadowblk.cli that defines it
COMMANDS = {
    "doctor": "doctor",
    "serve": "serve",
    "dirty": "dirty",
    "shadow": "shadow",
    "scrub": "scrub",
    "verify": "verify",
    "predict": "predict",
    "manager": "manager",
    "volume": "volume",
    "server": "server",
    "placement": "placement",
    "status": "status",
    "agent": "agent",
    "lab": "lab",
    "attach": "attach",
    "switchover": "switchover",
    "track": "track",
    "notify-device": "notify_device",
}


def _version(ctx: click.Context) -> None:
    """--version, read only when asked: importlib.metadata is slow to import."""
    click.echo(f"shadowblk, version {shadowblk.__version__}")
    ctx.exit()


class CommandTable(click.Group):
    """A click group whose commands are imported from COMMANDS on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        return importlib.import_module(f"shadowblk.cli.{module}").command


@click.group(
    cls=CommandTable,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--version",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=lambda ctx, _param, value: _version(ctx) if value else None,
    help="Show the version and exit.",
)
@click.option("-v", "--verbose", count=True, help="More log detail on stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """shadowblk keeps shadow volumes of primary volumes on other servers, verifies them,
    predicts server failure and switches a VM's volume to a shadow before the outage.

    Run `shadowblk COMMAND --help` for the details of each command.
    """
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
