"""What `shadowblk scrub` shows: the progress bar on a terminal, a report as text, and the
progress lines of a live scrub (its server's, or an agent's through the manager) followed to
their report."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import click

MB = 1_000_000
UNFINISHED = 2  # like "found, not repaired": the volume is not known to be clean


@contextmanager
def progressbar(total: int, quiet: bool, label: str = "scrub") -> Iterator[Any]:
    """A click progress bar on stderr (none when quiet or when stderr is not a terminal)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar


def render(data: dict) -> str:
    """A scrub report as text, one line per discrepancy."""
    lines = [
        f"scrubbed {data['volume']}: {data['bytes_scanned'] / MB:.1f} MB in {data['seconds']:.2f}s"
    ]
    lines += [
        f"warning: {w} (map rebuilt from the data; not re-read)" for w in data["rebuilt_maps"]
    ]
    for d in data["discrepancies"]:
        state = "repaired" if d["repaired"] else "NOT repaired"
        side = f"{d['side']} {d['shadow']}" if d.get("shadow") else d["side"]
        lines.append(
            f"block {d['block']} (offset {d['offset']}): {side} {d['kind']}, {state}"
            + (f" ({d['detail']})" if d["detail"] else "")
        )
    lines.append({0: "clean", 1: "found and repaired", 2: "found, not repaired"}[data["exit_code"]])
    return "\n".join(lines)


def follow(answers: Iterable[dict[str, Any]], quiet: bool, label: str = "scrub") -> dict[str, Any]:
    """Show a live scrub's progress lines; its report (ValueError: its error, or no report)."""
    with ExitStack() as stack:
        bar, opened, shown = None, False, 0
        for answer in answers:
            if "report" in answer:
                return answer["report"]
            if "error" in answer:
                raise ValueError(answer["error"])
            if "warning" in answer:
                click.echo(f"warning: {answer['warning']}", err=True)
                continue
            if not opened:  # the first progress line says how much there is to scan
                bar, opened = stack.enter_context(progressbar(answer["total"], quiet, label)), True
            if bar is not None:
                bar.update(answer["done"] - shown)
            shown = answer["done"]
    raise ValueError("the server closed the connection before its report")
