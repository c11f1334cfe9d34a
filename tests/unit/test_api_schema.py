"""Request validation against the served OpenAPI document, and the bearer token check."""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowblk.manager.api_errors import ApiError
from shadowblk.manager.api_schema import check, document
from shadowblk.manager.auth import generated_token, require_bearer


def refusal(schema: str, value: object) -> str:
    with pytest.raises(ApiError) as err:
        check(schema, value)
    assert err.value.status == 422
    return err.value.error


def test_the_document_describes_every_route() -> None:
    paths = document()["paths"]
    assert {"/v1/volumes", "/v1/servers/{name}/heartbeat", "/v1/status", "/v1/events"} <= set(paths)
    assert document()["openapi"].startswith("3.1")


def test_valid_bodies_pass() -> None:
    check("VolumeCreate", {"name": "v-1.a_b", "size_bytes": 1, "mode": "sync", "shadows": 0})
    check("Heartbeat", {"used_bytes": 0, "latency_ms": {"p99": 1.5}, "smart": {"sda": {}}})


def test_the_message_names_the_field() -> None:
    assert refusal("VolumeCreate", {"name": "v", "size_bytes": -1}) == (
        "body.size_bytes: -1 is less than the minimum of 1"
    )
    assert refusal("Heartbeat", {"used_bytes": 0, "latency_ms": {"p99": "slow"}}) == (
        "body.latency_ms.p99: 'slow' is not of type 'number'"
    )
    assert refusal("ServerRegistration", {"name": "s"}).startswith("body: 'zone' is a required")
    assert "does not match" in refusal("VolumeCreate", {"name": "x" * 64, "size_bytes": 1})


def test_bearer() -> None:
    require_bearer("Bearer s3cret", "s3cret")
    require_bearer("bearer  s3cret ", "s3cret")
    for header in (None, "", "s3cret", "Basic s3cret", "Bearer other", "Bearer ünïcode"):
        with pytest.raises(ApiError) as err:
            require_bearer(header, "s3cret")
        assert err.value.status == 401


def test_a_generated_token_is_kept_private_and_reused(tmp_path: Path) -> None:
    token, path = generated_token(tmp_path / "state")
    assert len(token) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert generated_token(tmp_path / "state") == (token, path)
