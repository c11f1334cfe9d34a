"""Text for the fleet commands: aligned tables and sizes an operator reads at a glance."""

from __future__ import annotations

from collections.abc import Sequence


def size(n: int) -> str:
    """Bytes in binary units: 10.0G, 512.0M, 4.0K, 100B."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return f"{n}B"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; an empty table says so."""
    if not rows:
        return "(none)"
    cells = [list(header), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )
