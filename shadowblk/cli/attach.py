"""`shadowblk attach`: the VM's stable NBD endpoint for a volume, repointable without an error."""

from __future__ import annotations

from pathlib import Path

import click
import uvloop

from shadowblk.attach.follow import Follower
from shadowblk.attach.router import Refused, Router
from shadowblk.attach.service import run
from shadowblk.cli.remote import _token
from shadowblk.cli.serve import parse_listen
from shadowblk.manager.client import Client, ManagerError


@click.command("attach")
@click.argument("volume")
@click.option("--listen", default=None, help="HOST:PORT where the VM's NBD client connects.")
@click.option(
    "--dm",
    "dm_name",
    default=None,
    help="Instead of --listen: /dev/mapper/NAME over the kernel NBD client (see docs/attach.md).",
)
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
@click.option(
    "--nbd-timeout",
    default=30,
    show_default=True,
    type=click.IntRange(1, 3600),
    help="--dm: seconds the kernel NBD client waits for an answer before it drops the "
    "connection (the request fails with EIO); the device then holds I/O until the next "
    "repoint. Shorter: a silently vanished host's in-flight requests fail sooner; longer: a "
    "slow primary (a sync FLUSH, a dying drive) is not turned into EIO. A closed or reset "
    "connection (a dead process, a rebooted host) is noticed at once whatever it is "
    "(docs/attach.md).",
)
@click.option(
    "--dm-swap",
    type=click.Choice(["one", "two"]),
    default="one",
    show_default=True,
    help="--dm: swap the table with one ioctl (a resume, in which the kernel suspends, swaps "
    "and resumes) or with two (a suspend, then a resume: the device stays suspended while "
    "this process is between them); `two` is there for tools/bench/dm_pause's comparison.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The manager's bearer token, to register --control so that switchovers push the "
    "repoint [else env SHADOWBLK_TOKEN]; without one, --manager is followed by polling only.",
)
def command(
    volume: str,
    listen: str | None,
    dm_name: str | None,
    upstream: str | None,
    manager_url: str | None,
    poll: float,
    generation: int,
    control: str | None,
    hold_time: float,
    nbd_timeout: int,
    dm_swap: str,
    token_file: Path | None,
) -> None:
    """Serve VOLUME over NBD at --listen, forwarding to --upstream or to the primary the
    manager names (--manager).

    Prints `ready nbd://HOST:PORT/VOLUME` once it accepts clients. `POST /repoint
    {"uri": "nbd://...", "generation": N}` on --control moves every client to another upstream:
    they see a pause, never an error. SIGTERM or SIGINT stop it.

    --dm NAME instead of --listen: /dev/mapper/NAME, dm-linear over the kernel NBD client
    connected to --upstream or the manager's primary; a repoint is a device-mapper table swap
    (`ready /dev/mapper/NAME over /dev/nbdX`).
    """
    if (upstream is None) == (manager_url is None):
        raise click.UsageError("give exactly one of --upstream and --manager")
    if (listen is None) == (dm_name is None):
        raise click.UsageError("give exactly one of --listen and --dm")
    control_at = parse_listen(control) if control else None
    follower = None
    if manager_url is not None:
        try:
            follower = Follower(Client(manager_url, _token(token_file)), volume, poll)
        except ManagerError as exc:
            raise click.BadParameter(str(exc), param_hint="--manager") from None
    if dm_name is not None:
        _kernel(dm_name, (nbd_timeout, hold_time), follower or (str(upstream), generation),
                control_at, dm_swap)  # fmt: skip
        return
    assert listen is not None
    where = parse_listen(listen)

    async def first(router: Router) -> None:
        try:
            if follower is not None:
                await follower.first(router, hold_time)
            else:
                await router.repoint(upstream, generation)
        except Refused as exc:
            raise click.ClickException(str(exc)) from None

    follow = follower.run if follower is not None else None
    bound = follower.announce if follower is not None else None
    try:
        uvloop.run(run(volume, where, first, control_at, hold_time, follow, bound))
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


def _kernel(
    name: str,
    times: tuple[int, float],
    upstream: tuple[str, int] | Follower,
    control: tuple[str, int] | None,
    swap: str,
) -> None:
    """--dm: the device-mapper table swap instead of the userspace router; TIMES: the kernel
    NBD client's timeout, the hold time of a lost connection; SWAP: --dm-swap."""
    from shadowblk.attach import kernel_service
    from shadowblk.attach.kernel import KernelAttach

    try:
        attach = KernelAttach(name, *times, swap=swap)
        uvloop.run(kernel_service.run(attach, upstream, control))
    except (OSError, Refused) as exc:
        raise click.ClickException(str(exc)) from None
