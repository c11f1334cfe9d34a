"""`python -m shadowblk.cli`: the same as the `shadowblk` command."""

from shadowblk.cli.main import cli

cli(prog_name="shadowblk")
