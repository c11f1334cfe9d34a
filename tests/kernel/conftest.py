"""The kernel tests share one guest boot per test session (see lab_run.py)."""

from pathlib import Path

import pytest

from tests.kernel.lab_run import LabRun, boot_lab


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> LabRun:
    """The one guest run: every part's results and the host files behind its disks."""
    work: Path = tmp_path_factory.mktemp("kernel-lab")
    run = boot_lab(work)
    run.result.check()
    return run
