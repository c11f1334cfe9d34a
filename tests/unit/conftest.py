"""Fixtures shared by the unit tests: the metadata store on each backend (SQLite, a real etcd)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcd import start_etcd
from tests.procs import Processes


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One etcd for the module; each test works under its own key prefix."""
    tmp = tmp_path_factory.mktemp("etcd")
    group = Processes(tmp)
    try:
        _, url = start_etcd(group, tmp / "data")
        yield url.replace("http://", "etcd://")
    finally:
        group.stop_all()


@pytest.fixture(params=["sqlite", "etcd"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store on each backend: a SQLite file, or its own key prefix in the etcd."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'meta.db'}"
    return f"{request.getfixturevalue('etcd_url')}/t{uuid.uuid4().hex[:12]}"
