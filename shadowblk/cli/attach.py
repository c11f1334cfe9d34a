"""`shadowblk attach`: the VM's stable NBD endpoint for a volume, repointable without an error."""

from __future__ import annotations

import click
import uvloop

from shadowblk.attach.follow import Follower
from shadowblk.attach.router import Refused, Router
from shadowblk.attach.service import run
from shadowblk.cli.serve import parse_listen
from shadowblk.manager.client import Client, ManagerError


@click.command("attach")
@click.argument("volume")
@click.option("--listen", required=True, help="HOST:PORT where the VM's NBD client connects.")
@click.option("--upstream", default=None, help="The primary: nbd://HOST:PORT/NAME.")
@click.option(
    "--manager",
    "manager_url",
    default=None,
    help="Follow the manager's volume map at this URL instead of a fixed --upstream.",
)
@click.option(
    "--poll",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0.05, 60),
    help="Seconds between two looks at the manager's volume map (--manager).",
)
@click.option(
    "--generation",
    default=0,
    show_default=True,
    type=click.IntRange(0, 2**63 - 1),
    help="The generation of --upstream; a repoint to an older one is refused.",
)
@click.option("--control", default=None, help="HOST:PORT of the HTTP control endpoint.")
@click.option(
    "--hold-time",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="Seconds a request is held without an upstream before the client gets EIO.",
)
def command(
    volume: str,
    listen: str,
    upstream: str | None,
    manager_url: str | None,
    poll: float,
    generation: int,
    control: str | None,
    hold_time: float,
) -> None:
    """Serve VOLUME over NBD at --listen, forwarding to --upstream or to the primary the
    manager names (--manager).

    Prints `ready nbd://HOST:PORT/VOLUME` once it accepts clients. `POST /repoint
    {"uri": "nbd://...", "generation": N}` on --control moves every client to another upstream:
    they see a pause, never an error. SIGTERM or SIGINT stop it.
    """
    if (upstream is None) == (manager_url is None):
        raise click.UsageError("give exactly one of --upstream and --manager")
    where = parse_listen(listen)
    control_at = parse_listen(control) if control else None
    follower = None
    if manager_url is not None:
        try:
            follower = Follower(Client(manager_url), volume, poll)
        except ManagerError as exc:
            raise click.BadParameter(str(exc), param_hint="--manager") from None

    async def first(router: Router) -> None:
        try:
            if follower is not None:
                await follower.first(router, hold_time)
            else:
                await router.repoint(upstream, generation)
        except Refused as exc:
            raise click.ClickException(str(exc)) from None

    follow = follower.run if follower is not None else None
    try:
        uvloop.run(run(volume, where, first, control_at, hold_time, follow))
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
