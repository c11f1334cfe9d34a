"""The router's refusals that need no upstream, and the parsing of upstream URIs."""

from __future__ import annotations

import asyncio

import pytest

from shadowblk.attach.router import Refused, Router
from shadowblk.attach.upstream import Target, UpstreamError


@pytest.mark.parametrize(
    ("uri", "target"),
    [
        ("nbd://127.0.0.1:10810/vol", Target("127.0.0.1", 10810, "vol")),
        ("nbd://host/vol", Target("host", 10809, "vol")),
        ("nbd://[::1]:7/", Target("::1", 7, "")),
    ],
)
def test_target_parse(uri: str, target: Target) -> None:
    assert Target.parse(uri) == target


@pytest.mark.parametrize("uri", ["http://h/v", "nbd:///v", "nbd://h:99999/v", "vol", ""])
def test_target_parse_refuses(uri: str) -> None:
    with pytest.raises(UpstreamError):
        Target.parse(uri)


def test_older_generation_and_bad_uri_refused_before_any_connection() -> None:
    async def attempts() -> list[int]:
        router = Router()
        router.generation = 7
        statuses = []
        for uri, generation in (("nbd://127.0.0.1:1/v", 6), ("ftp://x/v", 8)):
            with pytest.raises(Refused) as refused:
                await router.repoint(uri, generation)
            statuses.append(refused.value.status)
        assert router.generation == 7 and router.upstream is None
        return statuses

    assert asyncio.run(attempts()) == [409, 422]
