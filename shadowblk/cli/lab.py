"""`shadowblk lab up|down`: a whole fleet on loopback, to try shadowblk and to test it."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from shadowblk.cli.manager import parse_duration
from shadowblk.lab.fleet import (
    LAB_FILE,
    Lab,
    Options,
    Predictor,
    Replay,
    alive,
    read_lab,
    take_down,
)


@click.group("lab")
def command() -> None:
    """A manager and N agents as processes on this machine, with file-backed volumes."""


def _how_to(lab: Lab) -> str:
    doc = lab.doc
    url, token = doc["manager"]["url"], doc["manager"]["token_file"]
    agents = ", ".join(f"{a['name']} ({a['zone']})" for a in doc["agents"])
    return f"""\
lab in {lab.dir}: manager {url} on {doc["store"]}; agents {agents}
  export SHADOWBLK_MANAGER={url}
  export SHADOWBLK_TOKEN=$(cat {token})
  shadowblk server list
  shadowblk volume create v1 --size 1G --shadows 1
  shadowblk server show s1 --json    # health.hosted: each volume's nbd:// endpoint
  nbdinfo nbd://127.0.0.1:PORT/v1    # the endpoint the primary's server reports
logs in {lab.dir}/logs; stop with Ctrl-C or: shadowblk lab down --dir {lab.dir}"""


@command.command("up")
@click.option("--servers", type=click.IntRange(1, 64), default=3, show_default=True)
@click.option("--zones", type=click.IntRange(min=1), default=None, help="[default: min(N, 3)]")
@click.option("--dir", "lab_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--store", type=click.Choice(["sqlite", "etcd"]), default="sqlite", show_default=True)
@click.option("--capacity", default="16G", show_default=True, help="What each agent offers.")
@click.option(
    "--heartbeat-interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True
)
@click.option("--heartbeat-timeout", type=click.FloatRange(min=0.5), default=6.0, show_default=True)
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The manager's SMART failure model (`make smart-model`) [default: none, SMART unscored].",
)
@click.option(
    "--preempt-threshold",
    type=click.FloatRange(0, 1, min_open=True),
    help="The manager's --preempt-threshold [default: the manager's, 0.5].",
)
@click.option(
    "--preempt-sustain",
    metavar="DURATION",
    help="The manager's --preempt-sustain: 30s, 10m, 1h [default: the manager's, 1h].",
)
@click.option("--preempt-dry-run", is_flag=True, help="The manager only records its decisions.")
@click.option(
    "--smart-replay",
    "replays",
    multiple=True,
    metavar="SERVER=FILE",
    help="Server SERVER (s1, s2...) reports this recorded drive instead of smartctl (its agent's "
    "--smart-replay: a Backblaze daily CSV or the start-stop extract). Repeatable.",
)
@click.option(
    "--smart-serial",
    "serials",
    multiple=True,
    metavar="SERVER=SERIAL",
    help="The drive SERVER replays, when its file holds several. Repeatable.",
)
@click.option(
    "--replay-start",
    "starts",
    multiple=True,
    metavar="SERVER=YYYY-MM-DD",
    help="The recorded date SERVER's replay starts at (the days before are its history at once). "
    "Repeatable.",
)
@click.option(
    "--replay-speed",
    type=click.FloatRange(min=0, min_open=True),
    help="Recorded days per second of every replay [default: the agent's, 1].",
)
def up(
    servers: int,
    zones: int | None,
    lab_dir: Path,
    store: str,
    capacity: str,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    model_path: Path | None,
    preempt_threshold: float | None,
    preempt_sustain: str | None,
    preempt_dry_run: bool,
    replays: tuple[str, ...],
    serials: tuple[str, ...],
    starts: tuple[str, ...],
    replay_speed: float | None,
) -> None:
    """Start a lab in DIR and stay until Ctrl-C, SIGTERM or `shadowblk lab down --dir DIR`.

    Prints `ready MANAGER_URL` and how to use it once every agent has registered; DIR/lab.json
    lists the processes (pids, the manager's URL, the token file, the predictor's options and
    each agent's replay).

    \b
    A failing drive replayed on s1, a day every 2 s, its volumes moved once the manager's
    probability has stayed over 0.5 for 10 s:
      shadowblk lab up --dir /tmp/lab --model build/smart-model.json \\
        --preempt-sustain 10s --smart-replay s1=../shared/data/hds.csv.gz \\
        --smart-serial s1=9VS1QC90 --replay-start s1=2014-04-21 --replay-speed 0.5
    """
    predictor = _predictor(model_path, preempt_threshold, preempt_sustain, preempt_dry_run)
    replay = _replays(servers, replays, serials, starts, replay_speed)
    lab_dir.mkdir(parents=True, exist_ok=True)
    lab_dir = lab_dir.resolve()
    if (lab_dir / LAB_FILE).exists() and alive(read_lab(lab_dir)["pid"]):
        raise click.ClickException(f"a lab already runs in {lab_dir}")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    lab = Lab(lab_dir)
    opts = Options(
        servers, zones or min(servers, 3), store, capacity, heartbeat_interval, heartbeat_timeout,
        predictor, replay,
    )  # fmt: skip
    try:
        lab.up(opts)
    except RuntimeError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"ready {lab.doc['manager']['url']}")
    click.echo(_how_to(lab))
    while not stopping.wait(0.5):
        pass
    click.echo("stopping the lab", err=True)
    lab.down()


def _predictor(
    model_path: Path | None, threshold: float | None, sustain: str | None, dry_run: bool
) -> Predictor:
    """The manager's predictor options, checked now: a bad one is a usage error here rather
    than a manager that exits during `lab up`."""
    if sustain is not None:
        try:
            parse_duration(sustain)
        except click.BadParameter as err:
            raise click.BadParameter(err.message, param_hint="--preempt-sustain") from None
    if model_path is not None:
        from shadowblk.predict.model import Model  # numpy: only when asked for

        try:
            Model.load(model_path)
        except (ValueError, OSError) as err:
            raise click.BadParameter(str(err), param_hint="--model") from None
    return Predictor(model_path.resolve() if model_path else None, threshold, sustain, dry_run)


def _replays(
    servers: int,
    files: tuple[str, ...],
    serials: tuple[str, ...],
    starts: tuple[str, ...],
    speed: float | None,
) -> dict[str, Replay]:
    """Each replaying server's drive; a usage error for a server that is not in the lab, a
    missing file, or a serial or start date for a server that replays nothing."""
    names = [f"s{i}" for i in range(1, servers + 1)]
    replayed = _per_server(files, "--smart-replay", names)
    extra = {"--smart-serial": _per_server(serials, "--smart-serial", names),
             "--replay-start": _per_server(starts, "--replay-start", names)}  # fmt: skip
    for option, given in extra.items():
        if unreplayed := sorted(set(given) - set(replayed)):
            why = f"no --smart-replay for {', '.join(unreplayed)}"
            raise click.BadParameter(why, param_hint=option)
    for name, file in replayed.items():
        if not Path(file).is_file():
            raise click.BadParameter(f"{name}: no file {file}", param_hint="--smart-replay")
    return {
        name: Replay(Path(file).resolve(), extra["--smart-serial"].get(name),
                     extra["--replay-start"].get(name), speed)
        for name, file in replayed.items()
    }  # fmt: skip


def _per_server(values: tuple[str, ...], option: str, names: list[str]) -> dict[str, str]:
    """SERVER=VALUE pairs as a dict; a usage error for a malformed pair, an unknown server or
    a server given twice."""
    found: dict[str, str] = {}
    for text in values:
        name, sep, value = text.partition("=")
        if not sep or not value:
            raise click.BadParameter(f"{text!r} is not SERVER=VALUE", param_hint=option)
        if name not in names:
            raise click.BadParameter(
                f"no server {name!r} in this lab ({names[0]}..{names[-1]})", param_hint=option
            )
        if name in found:
            raise click.BadParameter(f"{name} given twice", param_hint=option)
        found[name] = value
    return found


@command.command("down")
@click.option("--dir", "lab_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def down(lab_dir: Path) -> None:
    """Stop the lab running in DIR (its agents stop their volumes' processes first)."""
    try:
        ended = take_down(lab_dir)
    except FileNotFoundError:
        raise click.ClickException(f"no lab runs in {lab_dir} (no {LAB_FILE})") from None
    if not ended:
        raise click.ClickException(f"the lab in {lab_dir} did not stop within 60 s")
    click.echo(f"lab in {lab_dir} stopped")
