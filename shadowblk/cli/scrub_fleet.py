"""`shadowblk scrub VOLUME` and `shadowblk scrub --all`: scrubs through the manager, which asks
each volume's primary agent to scrub it live against its shadows (POST /v1/volumes/NAME/scrub).

The exit code is the local form's, for cron: 0 clean, 1 found and repaired, 2 found and not
repaired or the scrub could not run (no manager, unknown volume, agent unreachable); for
--all, the worst over the volumes. One volume that cannot be scrubbed does not stop the others.
"""

from __future__ import annotations

from typing import Any

import click

from shadowblk.cli.output import emit
from shadowblk.cli.remote import explain
from shadowblk.cli.scrub_output import MB, UNFINISHED, follow, render
from shadowblk.manager.client import Client, ManagerError, Unreachable

SUMMARY = {0: "clean", 1: "found and repaired", 2: "found, not repaired, or not scrubbed"}


def _why(err: ManagerError) -> str:
    if isinstance(err, Unreachable):
        return f"{err.error} (give --manager URL or set SHADOWBLK_MANAGER)"
    return explain(err)


def scrub_volume(
    client: Client, name: str, repair: bool, rate: float | None, quiet: bool
) -> dict[str, Any]:
    """NAME's report, or `{"volume", "error", "exit_code": 2}` saying why it was not scrubbed."""
    try:
        answers = client.scrub(name, repair, rate * MB if rate else None)
        return follow(answers, quiet, label=f"scrub {name}")
    except ManagerError as err:
        why = _why(err)
    except ValueError as err:  # the agent's or its server's error line
        why = str(err)
    return {"volume": name, "error": why, "exit_code": UNFINISHED}


def _render_all(doc: dict[str, Any]) -> str:
    counts = [r["exit_code"] for r in doc["volumes"]]
    parts = [f"{counts.count(code)} {what}" for code, what in SUMMARY.items() if code in counts]
    return f"{len(counts)} volume(s): {', '.join(parts) or 'none in the fleet'}"


def run(client: Client, name: str | None, repair: bool, rate: float | None, as_json: bool) -> int:
    """Scrub NAME, or every volume of the fleet (NAME None); print the outcome; the exit code."""
    if name is not None:
        report = scrub_volume(client, name, repair, rate, as_json)
        if "error" in report:
            click.echo(f"error: scrub of {name}: {report['error']}", err=True)
        else:
            emit(report, as_json, render)
        return report["exit_code"]
    try:
        names = [v["name"] for v in client.volumes()]
    except ManagerError as err:
        click.echo(f"error: the fleet's volumes: {_why(err)}", err=True)
        return UNFINISHED
    reports = []
    for volume in names:
        report = scrub_volume(client, volume, repair, rate, as_json)
        if "error" in report:
            click.echo(f"error: scrub of {volume}: {report['error']}", err=True)
        elif not as_json:
            click.echo(render(report))
        reports.append(report)
    worst = max((r["exit_code"] for r in reports), default=0)
    emit({"volumes": reports, "exit_code": worst}, as_json, _render_all)
    return worst
