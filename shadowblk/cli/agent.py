"""`shadowblk agent`: one per storage server; hosts primary and shadow volumes as ordered."""

from __future__ import annotations

import logging
import secrets
import signal
from pathlib import Path

import click

from shadowblk.agent import notify
from shadowblk.agent.agent import Agent, Config
from shadowblk.agent.hosting import Endpoint
from shadowblk.agent.smart_source import ReplaySmart
from shadowblk.agent.udev_watch import udev_running
from shadowblk.cli import serve
from shadowblk.cli.remote import _token

log = logging.getLogger(__name__)


def _endpoint(_ctx: click.Context, param: click.Parameter, text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def _hmac_key(given: Path | None, data_dir: Path) -> Path:
    """--hmac-key-file, else DATA_DIR/hmac.key (made once: it only fits a lone agent, since
    primaries and their shadows must share one key)."""
    if given is not None:
        return given
    path = data_dir / "hmac.key"
    if not path.exists():
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
        log.warning("no --hmac-key-file: generated %s; give every agent the same key", path)
    return path


def _replay(
    path: Path | None, serial: str | None, speed: float, start: str | None
) -> ReplaySmart | None:
    """The --smart-replay source; a file the predictor cannot read is a one-line error."""
    if path is None:
        if serial or start:
            raise click.UsageError("--smart-serial and --replay-start need --smart-replay")
        return None
    try:
        return ReplaySmart(path, serial, speed, start)
    except ValueError as err:  # DataFormatError, a bad date
        raise click.BadParameter(str(err), param_hint="--smart-replay") from None


def serve_has_shadows() -> bool:
    """Whether this `shadowblk serve` takes --shadow (replication wired into the primary)."""
    return any("--shadow" in p.opts for p in serve.command.params)


@click.command("agent")
@click.option(
    "--manager",
    "manager_url",
    envvar="SHADOWBLK_MANAGER",
    required=True,
    help="The manager's URL, or several comma-separated (any of the fleet's managers) "
    "[env SHADOWBLK_MANAGER].",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The manager's bearer token [else env SHADOWBLK_TOKEN].",
)
@click.option("--name", required=True, help="This server's name in the fleet.")
@click.option("--zone", required=True, help="Failure domain: shadows go to other zones.")
@click.option("--rack", default="default", show_default=True, help="Failure domain in the zone.")
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where volumes and the agent's state live.",
)
@click.option(
    "--listen",
    required=True,
    callback=_endpoint,
    help="HOST:PORT of the shadow server (delta streams from primaries; port 0: any).",
)
@click.option(
    "--nbd-listen",
    required=True,
    callback=_endpoint,
    help="HOST:PORT for primaries' NBD exports: one port per volume from PORT up "
    "(0: any free port).",
)
@click.option(
    "--capacity",
    default=None,
    help="Space offered for volumes (64G) [default: the data dir's filesystem].",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between heartbeats.",
)
@click.option(
    "--hmac-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Delta streams' shared secret [default: DATA_DIR/hmac.key, generated].",
)
@click.option(
    "--metrics-listen",
    default=None,
    callback=lambda ctx, param, text: _endpoint(ctx, param, text) if text else None,
    help="HOST:PORT to serve Prometheus /metrics on (port 0: any; the log says which).",
)
@click.option(
    "--control-listen",
    default=None,
    callback=lambda ctx, param, text: _endpoint(ctx, param, text) if text else None,
    help="HOST:PORT of the switchover calls from the manager [default: --listen's host, any "
    "free port]; registered as the server's control_address.",
)
@click.option(
    "--watch-udev/--no-watch-udev",
    default=None,
    help="Watch udev for block devices tagged shadowblk (udev/90-shadowblk.rules): the removal "
    "of a primary volume's device asks the manager for its emergency switchover at once "
    "[default: on where udev runs].",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write agent.json, how `shadowblk notify-device` (the udev rule's RUN) reaches "
    f"this agent [default: {notify.RUN_DIR} where udev runs, else none].",
)
@click.option(
    "--smart-replay",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Report a recorded drive as this server's only disk instead of smartctl: a Backblaze "
    "daily CSV or the start-stop extract (.csv or .csv.gz), one recorded day at a time.",
)
@click.option("--smart-serial", help="The drive to replay, when the file holds several.")
@click.option(
    "--replay-speed",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Recorded days per second of the replay.",
)
@click.option(
    "--replay-start",
    metavar="YYYY-MM-DD",
    help="Start the replay at this recorded date (the days before are the disk's history at "
    "once) [default: the first day].",
)
def command(
    manager_url: str,
    token_file: Path | None,
    name: str,
    zone: str,
    rack: str,
    data_dir: Path,
    listen: Endpoint,
    nbd_listen: Endpoint,
    capacity: str | None,
    interval: float,
    hmac_key_file: Path | None,
    metrics_listen: Endpoint | None,
    control_listen: Endpoint | None,
    watch_udev: bool | None,
    run_dir: Path | None,
    smart_replay: Path | None,
    smart_serial: str | None,
    replay_speed: float,
    replay_start: str | None,
) -> None:
    """Run a storage server's agent: register, heartbeat with health, host volumes as ordered.

    Runs one `shadowblk shadow` child for the shadow volumes and one `shadowblk serve` child per
    primary, restarting a child that dies. Prints `ready agent NAME MANAGER_URL` once registered;
    SIGTERM or SIGINT stop it and its children cleanly.
    """
    replay = _replay(smart_replay, smart_serial, replay_speed, replay_start)  # bad file: no state
    data_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = Config(
        manager=manager_url,
        token=_token(token_file),
        name=name,
        zone=zone,
        rack=rack,
        data_dir=data_dir,
        listen=listen,
        nbd_listen=nbd_listen,
        capacity=serve.parse_size(capacity) if capacity else None,
        interval=interval,
        hmac_key_file=_hmac_key(hmac_key_file, data_dir),
        serve_has_shadows=serve_has_shadows(),
        metrics_listen=metrics_listen,
        control_listen=control_listen,
        watch_udev=udev_running() if watch_udev is None else watch_udev,
        run_dir=run_dir or (notify.RUN_DIR if udev_running() else None),
        smart_replay=replay,
    )
    if not config.serve_has_shadows:
        log.warning("`shadowblk serve` has no --shadow yet: primaries run without replication")
    agent = Agent(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    try:
        agent.run()
    except (RuntimeError, OSError) as err:
        raise click.ClickException(str(err)) from None
