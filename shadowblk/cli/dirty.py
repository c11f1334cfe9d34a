"""`shadowblk dirty`: the extents the write tracker recorded, read from its state folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from shadowblk.cli.output import emit, json_option
from shadowblk.tracking.tracker import StateError, recover_dirty


def _human(report: dict[str, Any]) -> str:
    lines = [f"{offset} {length}" for offset, length in report["extents"]]
    lines += [f"# note: {note}" for note in report["notes"]]
    lines.append(
        f"# {report['dirty_bytes']} dirty bytes in {len(report['extents'])} extents "
        f"of a {report['size']}-byte volume (block size {report['block_size']})"
    )
    return "\n".join(lines)


@click.command("dirty")
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The --state-dir of `shadowblk serve`.",
)
@json_option
def command(state_dir: Path, as_json: bool) -> None:
    """Print the dirty extents (byte offset, length) the tracker recorded for a volume.

    Works on a running server's state and after a crash (then it may over-report, never
    under-report).
    """
    try:
        bitmap, notes = recover_dirty(state_dir)
    except StateError as exc:
        raise click.ClickException(str(exc)) from None
    extents = [[offset, length] for offset, length in bitmap.extents()]
    report = {
        "size": bitmap.size,
        "block_size": bitmap.block_size,
        "dirty_bytes": sum(length for _, length in extents),
        "extents": extents,
        "notes": notes,
    }
    emit(report, as_json, _human)
