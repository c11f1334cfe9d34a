"""Fixtures shared by all tests: a per-test process group and a log folder kept on failure."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Processes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Processes started by the test; every one is ended at teardown, pass or fail."""
    group = Processes(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()
