"""The kernel tests share one guest boot per test session (see lab_run.py)."""

from pathlib import Path

import pytest

from tests.kernel.lab_run import LabRun, boot_lab

BOOT_TIMEOUT = 1500  # seconds for the guest run (lab_run.boot_lab kills QEMU before this)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The first test that needs the lab pays for its boot: give those tests time for it
    (several parts start the host's Python in the guest, 10-60 s each under TCG)."""
    for item in items:
        if "lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(BOOT_TIMEOUT))


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> LabRun:
    """The one guest run: every part's results and the host files behind its disks."""
    work: Path = tmp_path_factory.mktemp("kernel-lab")
    run = boot_lab(work)
    run.result.check()
    return run
