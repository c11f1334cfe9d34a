"""`shadowblk scrub`: re-read a volume, check every block against its checksum map, repair from
the good side, record what was found. Exit code for cron: 0 clean, 1 found and repaired,
2 found and not (all) repaired, or the scrub could not finish.

Local forms: files at rest (`--image/--map`, optionally a peer copy), scrubbed here; and a
volume a running `serve` holds (`--state-dir DIR`), scrubbed by that server through its
DIR/scrub.sock (shadowblk.nbd.scrub_control), which streams progress and the report back.
Fleet forms (`VOLUME`, `--all`): through the manager and the primary's agent (scrub_fleet).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from shadowblk.cli import scrub_fleet
from shadowblk.cli.output import emit, json_option
from shadowblk.cli.remote import make_client, manager_options
from shadowblk.cli.scrub_output import MB, UNFINISHED, follow, progressbar, render
from shadowblk.integrity.checksum_map import ChecksumMap, MapBusyError
from shadowblk.integrity.discrepancies import FILENAME, DiscrepancyLog
from shadowblk.integrity.scrub import ScanOptions, ScrubReport, Side, scrub_one, scrub_pair
from shadowblk.manager.client import ManagerError
from shadowblk.nbd import scrub_control

existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)
map_file = click.Path(dir_okay=False, path_type=Path)


def run_scrub(
    sides: list[Side], options: ScanOptions, log: DiscrepancyLog, repair: bool, server: str | None
) -> ScrubReport:
    """One side alone, or a primary and its shadow."""
    if len(sides) == 1:
        return scrub_one(sides[0], options, log, server)
    return scrub_pair(sides[0], sides[1], options, log, repair, server)


def _scrub_files(
    pairs: list[tuple[str, Path, Path]],
    block_size: int | None,
    repair: bool,
    rate: float | None,
    direct: bool,
    log: DiscrepancyLog,
    server: str | None,
    quiet: bool,
) -> tuple[ScrubReport, list[str]]:
    """Open (or rebuild) the maps, scrub, close the maps; the report and the rebuild reasons."""
    with ExitStack() as stack:
        sides = []
        for name, img, mp in pairs:
            cmap = ChecksumMap.open_or_rebuild(mp, img, block_size, writable=repair)
            stack.enter_context(cmap)
            sides.append(Side(name, img, cmap))
        bar = stack.enter_context(progressbar(sum(s.map.size for s in sides), quiet))
        options = ScanOptions(
            rate=rate * MB if rate else None, direct=direct, progress=bar.update if bar else None
        )
        report = run_scrub(sides, options, log, repair, server)
        return report, [s.map.rebuilt_reason for s in sides if s.map.rebuilt_reason]


def _scrub_live(
    state_dir: Path,
    shadow: str | None,
    repair: bool,
    rate: float | None,
    server: str | None,
    quiet: bool,
) -> dict[str, Any]:
    """Have the server holding STATE_DIR scrub its volume; the report it sends back."""
    request = {"op": "scrub", "repair": repair, "rate": rate * MB if rate else None}
    request |= {"shadow": shadow, "server": server}
    return follow(scrub_control.ask(state_dir, request), quiet)


def _local_form_only(ctx: click.Context) -> None:
    """--manager and --token-file given on the command line go with VOLUME or --all only."""
    for name, flag in (("manager_url", "--manager"), ("token_file", "--token-file")):
        if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{flag} goes with VOLUME or --all (scrubs through the manager)")


@click.command("scrub")
@click.argument("volume", required=False)
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Scrub every volume of the fleet, through the manager, one after the other.",
)
@click.option("--image", type=existing_file, help="The volume's data file (at rest).")
@click.option("--map", "map_path", type=map_file, help="Its checksum map.")
@click.option(
    "--state-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The state folder of a running `serve`: that server scrubs its volume.",
)
@click.option(
    "--shadow-verify",
    metavar="HOST:PORT",
    help="With --state-dir: a shadow's verify port, scrubbed too and used for read-repair.",
)
@click.option("--peer-image", type=existing_file, help="A shadow copy of the same volume.")
@click.option("--peer-map", type=map_file, help="The shadow copy's checksum map.")
@click.option("--repair", is_flag=True, help="Rewrite bad blocks from the side holding the truth.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Read limit in MB/s.")
@click.option(
    "--block-size",
    type=click.IntRange(min=512),
    help="Bytes per checksummed block [default: the map's; 4096 for a new map].",
)
@click.option("--direct", is_flag=True, help="Read with O_DIRECT (bypass the page cache).")
@click.option(
    "--record",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Discrepancy log [default: {FILENAME} next to --map].",
)
@click.option("--server", help="Server name in the records [default: this host's name].")
@json_option
@manager_options
@click.pass_context
def command(
    ctx: click.Context,
    volume: str | None,
    every: bool,
    image: Path | None,
    map_path: Path | None,
    state_dir: Path | None,
    shadow_verify: str | None,
    peer_image: Path | None,
    peer_map: Path | None,
    repair: bool,
    rate: float | None,
    block_size: int | None,
    direct: bool,
    record: Path | None,
    server: str | None,
    as_json: bool,
    manager_url: str,
    token_file: Path | None,
) -> None:
    """Check every block of a volume against its checksum map, and repair (--repair) each bad
    block from the side that holds the truth. Four forms:

    \b
    shadowblk scrub VOLUME    the fleet's VOLUME, by its primary's agent, against its shadows
    shadowblk scrub --all     every volume of the fleet, one after the other
    shadowblk scrub --state-dir DIR [--shadow-verify H:P]   the volume a running `serve` holds
    shadowblk scrub --image F --map M [--peer-image --peer-map]   files at rest

    VOLUME and --all go through the manager (--manager, or env SHADOWBLK_MANAGER). A missing,
    truncated or corrupt map is rebuilt from the data with a warning, never trusted. Exit code
    (--all: the worst over the volumes): 0 clean, 1 found and repaired, 2 found and not
    repaired, or the scrub could not run.
    """
    if volume is not None or every:
        if volume is not None and every:
            raise click.UsageError("give VOLUME or --all, not both")
        local = (state_dir, shadow_verify, image, map_path, peer_image, peer_map, block_size,
                 record, server)  # fmt: skip
        if any(v is not None for v in local) or direct:
            raise click.UsageError(
                "VOLUME and --all scrub through the manager, which knows where the volume and "
                "its shadows are: they go without --state-dir, --shadow-verify, the file "
                "options and --server"
            )
        try:
            client = make_client(manager_url, token_file)
        except ManagerError as err:
            raise click.UsageError(str(err)) from None
        sys.exit(scrub_fleet.run(client, volume, repair, rate, as_json))
    _local_form_only(ctx)
    if state_dir is not None:
        if image or map_path or peer_image or peer_map or block_size or direct or record:
            raise click.UsageError("--state-dir goes without the file options")
        try:
            data = _scrub_live(state_dir, shadow_verify, repair, rate, server, as_json)
        except OSError as exc:
            click.echo(
                f"error: no server answers on {state_dir / scrub_control.SOCKET_FILE} ({exc}): "
                "is the volume served with --checksums? At rest, use --image and --map",
                err=True,
            )
            sys.exit(UNFINISHED)
        except ValueError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(UNFINISHED)
        emit(data, as_json, render)
        sys.exit(data["exit_code"])
    if image is None or map_path is None or shadow_verify is not None:
        raise click.UsageError("give --image and --map (files at rest) or --state-dir (served)")
    if (peer_image is None) != (peer_map is None):
        raise click.UsageError("--peer-image and --peer-map go together")
    pairs = [("primary", image, map_path)]
    if peer_image is not None and peer_map is not None:
        pairs.append(("shadow", peer_image, peer_map))
    log = DiscrepancyLog(record or map_path.parent / FILENAME)
    try:
        report, rebuilt = _scrub_files(
            pairs, block_size, repair, rate, direct, log, server, as_json
        )
    except (OSError, ValueError) as exc:  # busy or unreadable files, copies of different volumes
        served = " (served: scrub it with --state-dir)" if isinstance(exc, MapBusyError) else ""
        click.echo(f"error: scrub did not finish: {exc}{served}", err=True)
        sys.exit(UNFINISHED)
    emit(report.as_dict(log.path, rebuilt), as_json, render)
    sys.exit(report.exit_code)
