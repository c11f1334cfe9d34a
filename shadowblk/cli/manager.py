"""`shadowblk manager`: the source of truth, serving the HTTP API over a store."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import click

from shadowblk.cli.serve import parse_listen

log = logging.getLogger(__name__)


def _store_url(text: str) -> str:
    """The store URL open_store takes; for etcd, the first of a comma-separated endpoint list
    (etcd's gateway client talks to one endpoint)."""
    if text.startswith("etcd://") and "," in text:
        first = text.removeprefix("etcd://").split(",")[0]
        log.warning("using the first etcd endpoint only: %s", first)
        return f"etcd://{first}"
    return text


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1h' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 30s, 10m or 1h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@click.command("manager")
@click.option(
    "--store",
    "store_url",
    required=True,
    help="sqlite:PATH or etcd://HOST:PORT[,HOST:PORT...][/PREFIX].",
)
@click.option(
    "--listen", default="127.0.0.1:7600", show_default=True, help="HOST:PORT (port 0: any free)."
)
@click.option(
    "--advertise",
    default=None,
    help="The URL other managers and clients reach this one at [default: http://LISTEN].",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The bearer token for changes [default: generated into STATE_DIR/token].",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/lib/shadowblk/manager"),
    show_default=True,
    help="Where a generated token is kept.",
)
@click.option(
    "--heartbeat-timeout",
    type=click.FloatRange(min=0.5),
    default=2.0,
    show_default=True,
    help="Seconds without a heartbeat before a server is marked down; also the primaries' "
    "write lease: an emergency switchover promotes a shadow once it has run out.",
)
@click.option(
    "--lease-ttl",
    type=click.IntRange(2, 5),
    default=3,
    show_default=True,
    help="Leader lease in seconds (etcd): a standby takes over about this long after a death.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The SMART failure model (`shadowblk predict train`, `make smart-model`) that scores "
    "the disks the agents report [default: none, SMART is not scored].",
)
@click.option(
    "--preempt-threshold",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.5,
    show_default=True,
    help="A server's failure probability at which its primaries are moved, once sustained.",
)
@click.option(
    "--preempt-sustain",
    callback=lambda ctx, param, text: parse_duration(text),
    default="1h",
    show_default=True,
    help="How long the probability must stay at or over the threshold (30s, 10m, 1h).",
)
@click.option(
    "--preempt-dry-run",
    is_flag=True,
    help="Only record and log what the predictor would move (event failure-preempt).",
)
def command(
    store_url: str,
    listen: str,
    advertise: str | None,
    token_file: Path | None,
    state_dir: Path,
    heartbeat_timeout: float,
    lease_ttl: int,
    model_path: Path | None,
    preempt_threshold: float,
    preempt_sustain: float,
    preempt_dry_run: bool,
) -> None:
    """Run the manager: the HTTP API (GET /openapi.json describes it) over the store.

    Prints `ready URL` on stdout once listening; logs go to stderr; SIGTERM stops it cleanly.
    """
    # imported here: aiohttp and the store engines would slow every other command's start
    from shadowblk.manager.api import make_app
    from shadowblk.manager.app import Manager, serve
    from shadowblk.manager.auth import TokenError, generated_token, read_token
    from shadowblk.manager.risk import RiskMonitor, RiskSettings
    from shadowblk.manager.store import StoreError
    from shadowblk.predict.model import Model
    from shadowblk.predict.trigger import TriggerSettings

    host, port = parse_listen(listen)
    try:
        model = Model.load(model_path) if model_path is not None else None
        trigger = TriggerSettings(
            threshold=preempt_threshold,
            sustain_seconds=preempt_sustain,
            rearm_below=preempt_threshold * 0.8,
            dry_run=preempt_dry_run,
        )
    except (ValueError, OSError) as err:  # ModelFileError is a ValueError
        raise click.ClickException(str(err)) from None
    try:
        if token_file is not None:
            token = read_token(token_file)
        else:
            token, where = generated_token(state_dir)
            click.echo(f"mutating requests need the bearer token in {where}", err=True)
    except (TokenError, OSError) as err:
        raise click.ClickException(str(err)) from None
    try:
        manager = Manager(_store_url(store_url), heartbeat_timeout, lease_ttl)
    except (StoreError, OSError) as err:
        raise click.ClickException(f"cannot open the store {store_url}: {err}") from None
    monitor = RiskMonitor(manager.store, model, RiskSettings(trigger), drain=manager.start_drain)
    manager.fleet.assess = monitor.assess
    try:
        asyncio.run(serve(manager, make_app(manager, token), host, port, advertise))
    except OSError as err:
        raise click.ClickException(f"cannot listen on {listen}: {err.strerror}") from None
