"""A benchmark's scratch folder: made under --dir (or the system's temp), removed afterwards
whatever happened, so a failed or interrupted run leaves no volume images behind."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def scratch(prefix: str, parent: Path | None) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
