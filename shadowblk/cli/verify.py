"""`shadowblk verify`: compare a live replicated primary with one of its shadows by checksum map
and hash tree, while writes continue (docs/integrity.md, "Verify"). Exit code: 0 clean, 1
discrepancies found (recorded in STATE_DIR/discrepancies.jsonl), 2 the two could not be
compared (no map, shadow not in sync, ...)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from shadowblk.cli.output import emit, json_option
from shadowblk.integrity.discrepancies import DiscrepancyLog
from shadowblk.integrity.verify import NotComparable, Verifier, VerifyReport

NOT_COMPARED = 2


def _render(data: dict[str, Any]) -> str:
    lines = []
    for i, rep in enumerate(data["compares"]):
        head = f"compare {i + 1}: " if len(data["compares"]) > 1 else ""
        if "error" in rep:
            lines.append(f"{head}not compared: {rep['error']}")
            continue
        lines.append(
            f"{head}{rep['volume']} vs shadow {rep['shadow']}: {rep['rounds']} round(s), "
            f"{rep['bytes_exchanged']} bytes exchanged, {rep['in_flight']} block(s) in flight "
            f"({rep['deferred']} differing, {rep['resolved']} rechecked equal), "
            f"{len(rep['differing'])} differing"
            + (f", {len(rep['still_in_flight'])} still in flight" if rep["still_in_flight"] else "")
        )
        for block in rep["differing_blocks"]:
            lines.append(f"  block {block} (offset {block * rep['block_size']}): maps differ")
    lines.append({0: "clean", 1: "DISCREPANCIES", 2: "not compared"}[data["exit_code"]])
    return "\n".join(lines)


@click.command("verify")
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The primary's state folder (`serve --state-dir`, with --checksums).",
)
@click.option(
    "--shadow",
    default=None,
    help="HOST:PORT of the shadow to compare with, as given to `serve --shadow` "
    "[default: the only one]. Without --shadow-data-dir the compare would go over the network "
    "(not available yet).",
)
@click.option(
    "--shadow-data-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The shadow's --data-dir, on this host.",
)
@click.option(
    "--recheck-timeout",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds to wait for blocks in flight to settle before calling them still in flight.",
)
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(1), help="Compares.")
@click.option("--interval", default=0.0, type=float, help="Seconds between repeated compares.")
@click.option("--server", default=None, help="Server name for the discrepancy log.")
@json_option
def command(
    state_dir: Path,
    shadow: str | None,
    shadow_data_dir: Path | None,
    recheck_timeout: float,
    repeat: int,
    interval: float,
    server: str | None,
    as_json: bool,
) -> None:
    """Compare the primary in STATE_DIR with a shadow, block by block checksum, while the
    volume is in use: blocks written but not yet acknowledged by the shadow are deferred and
    rechecked once acknowledged, never reported as discrepancies."""
    if shadow_data_dir is None:
        raise click.UsageError(
            "--shadow-data-dir is needed: the network form (--shadow HOST:PORT alone) needs the "
            "shadow server to answer compare messages, which it does not do yet"
        )
    log = DiscrepancyLog.in_state_dir(state_dir)
    compares: list[dict[str, Any]] = []
    code = 0
    try:
        verifier = Verifier(state_dir, shadow_data_dir, shadow, server)
    except NotComparable as exc:
        compares.append({"error": str(exc)})
        code = NOT_COMPARED
    else:
        for i in range(repeat):
            if i and interval:
                time.sleep(interval)
            try:
                report: VerifyReport = verifier.verify(recheck_timeout, log)
            except NotComparable as exc:
                compares.append({"error": str(exc)})
                code = max(code, NOT_COMPARED) if code != 1 else code
                continue
            compares.append(report.as_dict())
            if report.differing:
                code = 1
    data = {
        "exit_code": code,
        "compares": compares,
        "false_alarm_rule": "blocks in flight are deferred and rechecked, never reported",
    }
    emit(data, as_json, _render)
    raise SystemExit(code)
