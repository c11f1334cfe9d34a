"""`shadowblk scrub`: re-read a volume, check every block against its checksum map, repair from
the good side, record what was found. Exit code for cron: 0 clean, 1 found and repaired,
2 found and not (all) repaired, or the scrub could not finish.

Today it works on files (`--image/--map`, optionally a peer copy); the `--state-dir`, VOLUME
and `--all` forms of live servers build the same `Side`s from a server's state and reuse
`run_scrub`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from shadowblk.cli.output import emit, json_option
from shadowblk.integrity.checksum_map import ChecksumMap
from shadowblk.integrity.discrepancies import FILENAME, DiscrepancyLog
from shadowblk.integrity.scrub import ScanOptions, ScrubReport, Side, scrub_one, scrub_pair

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


@click.command("scrub")
@click.option("--image", required=True, type=existing_file, help="The volume's data file.")
@click.option("--map", "map_path", required=True, type=map_file, help="Its checksum map.")
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
    image: Path,
    map_path: Path,
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
    """Check every block of --image against --map (and of a peer copy against its map).

    A missing, truncated or corrupt map is rebuilt from the data with a warning, never trusted.
    With a peer, each bad block is repaired (--repair) from the side that holds the truth.
    """
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
        click.echo(f"error: scrub did not finish: {exc}", err=True)
        sys.exit(UNFINISHED)
    data = {
        "volume": report.volume,
        "bytes_scanned": report.bytes_scanned,
        "seconds": round(report.seconds, 3),
        "rebuilt_maps": rebuilt,
        "discrepancies": [{**asdict(d), "block": d.block} for d in report.discrepancies],
        "repaired": report.repaired,
        "unrepaired": report.unrepaired,
        "record": str(log.path),
        "exit_code": report.exit_code,
    }
    emit(data, as_json, _render)
    sys.exit(report.exit_code)
