"""The `shadowblk` command: the group and the registration of every command module."""

import logging

import click

from shadowblk import __version__
from shadowblk.cli import doctor


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="shadowblk")
@click.option(
    "-v", "--verbose", count=True, help="More log detail on stderr (-v info, -vv debug)."
)
def cli(verbose: int) -> None:
    """shadowblk keeps shadow volumes of primary volumes on other servers, verifies them,
    predicts server failure and switches a VM's volume to a shadow before the outage.

    Run `shadowblk COMMAND --help` for the details of each command.
    """
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


cli.add_command(doctor.command)
