"""schemathesis against the OpenAPI document a real manager serves: generated requests, valid
and invalid, never get a 5xx, and every answer matches the document.

The schema is loaded at collection from the package (the same document the manager serves;
the fixture checks that), because schemathesis's lazy fixture loader does not run on pytest 9.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from shadowblk.manager.api_schema import document
from tests.manager_lab import register_servers, start_manager
from tests.procs import Processes

TOKEN = {"Authorization": "Bearer test-token-0123456789"}

schema = schemathesis.openapi.from_dict(document())


@pytest.fixture(scope="module")
def manager_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("schemathesis")
    group = Processes(workdir)
    try:
        lab = start_manager(group, f"sqlite:{workdir / 'meta.db'}", workdir)
        register_servers(lab)  # so that some generated volumes can be placed
        with urllib.request.urlopen(f"{lab.url}/openapi.json") as reply:
            assert json.load(reply) == json.loads(json.dumps(document()))
        yield lab.url
    finally:
        group.stop_all()


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error(case: schemathesis.Case, manager_url: str) -> None:
    case.call_and_validate(base_url=manager_url, headers=TOKEN)
