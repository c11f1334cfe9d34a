"""`shadowblk scrub`: re-read a volume, check every block against its checksum map, repair from
the good side, record what was found. Exit code for cron: 0 clean, 1 found and repaired,
2 found and not (all) repaired, or the scrub could not finish.

Two forms: files at rest (`--image/--map`, optionally a peer copy), scrubbed here; and a
volume a running `serve` holds (`--state-dir DIR`), scrubbed by that server through its
DIR/scrub.sock (shadowblk.nbd.scrub_control), which streams progress and the report back.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click

from shadowblk.cli.output import emit, json_option
from shadowblk.integrity.checksum_map import ChecksumMap, MapBusyError
from shadowblk.integrity.discrepancies import FILENAME, DiscrepancyLog
from shadowblk.integrity.scrub import ScanOptions, ScrubReport, Side, scrub_one, scrub_pair
from shadowblk.nbd import scrub_control

MB = 1_000_000
UNFINISHED = 2  # like "found, not repaired": the volume is not known to be clean
existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)
map_file = click.Path(dir_okay=False, path_type=Path)


@contextmanager
def _progressbar(total: int, quiet: bool) -> Iterator[Any]:
    """A click progress bar on stderr (none when quiet or when stderr is not a terminal)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label="scrub", file=sys.stderr) as bar:
        yield bar


def _render(data: dict) -> str:
    lines = [
        f"scrubbed {data['volume']}: {data['bytes_scanned'] / MB:.1f} MB in {data['seconds']:.2f}s"
    ]
    lines += [
        f"warning: {w} (map rebuilt from the data; not re-read)" for w in data["rebuilt_maps"]
    ]
    for d in data["discrepancies"]:
        state = "repaired" if d["repaired"] else "NOT repaired"
        lines.append(
            f"block {d['block']} (offset {d['offset']}): {d['side']} {d['kind']}, {state}"
            + (f" ({d['detail']})" if d["detail"] else "")
        )
    lines.append({0: "clean", 1: "found and repaired", 2: "found, not repaired"}[data["exit_code"]])
    return "\n".join(lines)


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
        bar = stack.enter_context(_progressbar(sum(s.map.size for s in sides), quiet))
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
    with ExitStack() as stack:
        bar, opened, shown = None, False, 0
        for answer in scrub_control.ask(state_dir, request):
            if "report" in answer:
                return answer["report"]
            if "error" in answer:
                raise ValueError(answer["error"])
            if not opened:  # the first progress line says how much there is to scan
                bar, opened = stack.enter_context(_progressbar(answer["total"], quiet)), True
            if bar is not None:
                bar.update(answer["done"] - shown)
            shown = answer["done"]
    raise ValueError("the server closed the connection before its report")


@click.command("scrub")
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
def command(
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
) -> None:
    """Check every block of --image against --map (and of a peer copy against its map), or of
    the volume a running server holds (--state-dir, and its shadow with --shadow-verify).

    A missing, truncated or corrupt map is rebuilt from the data with a warning, never trusted.
    With a peer, each bad block is repaired (--repair) from the side that holds the truth.
    """
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
        emit(data, as_json, _render)
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
    emit(report.as_dict(log.path, rebuilt), as_json, _render)
    sys.exit(report.exit_code)
