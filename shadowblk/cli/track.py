"""`shadowblk track --dm-era NAME`: kernel write tracking (dm-era) feeding the shadows."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import click

from shadowblk.cli.serve import Replication, parse_size, replication_options
from shadowblk.delta.replicator import Replicator
from shadowblk.kernel.dm import DeviceMapper, DMError
from shadowblk.tracking.dm_era import EraMetadata, EraMetadataError
from shadowblk.tracking.dm_era.source import EraSource
from shadowblk.tracking.dm_era.target import EraTarget, EraTargetError

BLOCK_SIZE = 4096  # the shipper's block; the era block is a multiple of it


def _written_since(target: EraTarget, since: int) -> dict:
    """Blocks written since era SINCE, read from a metadata snapshot taken and dropped here."""
    target.take_snapshot()
    try:
        md = EraMetadata.open(target.metadata, snapshot=True)
    finally:
        target.drop_snapshot()
    return {
        "era": md.current_era,
        "block_size": md.block_size,
        "blocks": list(md.written_since(since)),
        "extents": list(md.written_extents(since, target.size)),
    }


def _ship(target: EraTarget, replication: Replication, volume_id: str, state_dir: Path,
          interval: float, suspend_every: int) -> dict:  # fmt: skip
    """Ship until SIGTERM/SIGINT, then a last suspended pass and a drain; the final status."""
    fd = os.open(target.device, os.O_RDONLY | os.O_CLOEXEC)  # the shadows' full sync reads it
    rep = Replicator(volume_id, fd, target.size, list(replication.shadows),
                     state_dir / "replication", block_size=BLOCK_SIZE,
                     generation=replication.generation, mode="async",
                     level=replication.compress_level, max_lag_bytes=replication.max_lag_bytes,
                     cut_interval=None, hmac_key=replication.key, tls=replication.tls)  # fmt: skip
    source = EraSource(target, rep, state_dir / "dm-era.json")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    rep.start()
    try:
        print(f"ready dm-era {target.name} since era {source.since}", flush=True)
        source.follow(stop, interval, suspend_every)
        drained = rep.drain(replication.drain_timeout)
        return {**source.status(), "drained": drained, "replication": rep.status()}
    finally:
        rep.close()
        os.close(fd)


@click.command("track")
@click.option("--dm-era", "name", required=True, help="Name of the era target (/dev/mapper/NAME).")
@click.option("--metadata", type=click.Path(path_type=Path), help="Metadata device, to create.")
@click.option("--origin", type=click.Path(path_type=Path), help="Origin device, to create.")
@click.option("--era-block-size", default="64K", show_default=True,
              help="Tracking granularity of a new target (a multiple of 4K).")  # fmt: skip
@click.option("--checkpoint", is_flag=True, help="Cut an era, print the status, exit.")
@click.option("--written-since", type=click.IntRange(0), default=None,
              help="Print the blocks written since this era (JSON) and exit.")  # fmt: skip
@click.option("--volume-id", default=None, help="The volume's id at the shadows (to ship).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the tracker keeps the era it has shipped up to and what each shadow lacks "
    "(needed with --shadow).",
)
@click.option("--interval", type=click.FloatRange(0.01), default=1.0, show_default=True,
              help="Seconds between two passes over the era metadata.")  # fmt: skip
@click.option("--suspend-every", type=click.IntRange(1), default=5, show_default=True,
              help="Every Nth pass suspends the origin briefly (a consistent cut).")  # fmt: skip
@replication_options
def command(name: str, metadata: Path | None, origin: Path | None, era_block_size: str,
            checkpoint: bool, written_since: int | None, volume_id: str | None,
            state_dir: Path | None, interval: float, suspend_every: int,
            replication: Replication) -> None:  # fmt: skip
    """Track writes to an origin with the kernel's dm-era target NAME and ship them.

    Creates NAME over --origin (metadata on --metadata, which must start zeroed) unless it
    exists, in which case it is adopted. With --checkpoint or --written-since it answers and
    exits; with --shadow it reads the blocks written since the last pass every --interval
    seconds and ships them; shadows stay `resyncing` until a pass that suspends the origin
    (every --suspend-every passes, and at SIGTERM) has been applied. Prints `ready ...`, and
    a JSON status at the end. The cut points are the suspended passes: --max-lag is not used.
    """
    block_size = parse_size(era_block_size)
    if block_size % BLOCK_SIZE:
        raise click.BadParameter("must be a multiple of 4K", param_hint="--era-block-size")
    if replication.shadows:
        if replication.mode == "sync":
            raise click.UsageError("dm-era tracking is async: writes are read after the fact")
        replication.check(volume_id or "", state_dir, read_only=False)
    elif checkpoint is False and written_since is None:
        raise click.UsageError("give --checkpoint, --written-since or --shadow")
    try:
        with DeviceMapper() as dm:
            target = EraTarget.open(dm, name, metadata, origin, block_size)
            if target.size % BLOCK_SIZE:
                raise click.ClickException(f"{target.origin}: size is not a multiple of 4K")
            if checkpoint:
                era = target.checkpoint()
                click.echo(json.dumps({"era": era, **target.status().__dict__}))
            if written_since is not None:
                click.echo(json.dumps(_written_since(target, written_since)))
            if replication.shadows:
                assert volume_id is not None and state_dir is not None
                status = _ship(target, replication, volume_id, state_dir, interval,
                               suspend_every)  # fmt: skip
                click.echo(json.dumps(status))
    except (DMError, EraTargetError, EraMetadataError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
