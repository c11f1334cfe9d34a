"""`shadowblk lab up|down`: a whole fleet on loopback, to try shadowblk and to test it."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from shadowblk.lab.fleet import LAB_FILE, Lab, Options, alive, read_lab, take_down


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
def up(
    servers: int,
    zones: int | None,
    lab_dir: Path,
    store: str,
    capacity: str,
    heartbeat_interval: float,
    heartbeat_timeout: float,
) -> None:
    """Start a lab in DIR and stay until Ctrl-C, SIGTERM or `shadowblk lab down --dir DIR`.

    Prints `ready MANAGER_URL` and how to use it once every agent has registered; DIR/lab.json
    lists the processes (pids, the manager's URL, the token file).
    """
    lab_dir.mkdir(parents=True, exist_ok=True)
    lab_dir = lab_dir.resolve()
    if (lab_dir / LAB_FILE).exists() and alive(read_lab(lab_dir)["pid"]):
        raise click.ClickException(f"a lab already runs in {lab_dir}")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    lab = Lab(lab_dir)
    opts = Options(
        servers, zones or min(servers, 3), store, capacity, heartbeat_interval, heartbeat_timeout
    )
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
