"""`shadowblk scrub VOLUME / --all`: the usage errors and the missing manager, in process (the
fleet itself: tests/integration/test_scrub_fleet.py); and how the agent merges the passes of a
volume with several shadows."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from shadowblk.agent.scrub_call import merge
from shadowblk.cli.scrub import command
from shadowblk.ports import free_port


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(command, list(args), env={"SHADOWBLK_MANAGER": None})
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["v1", "--all"], "give VOLUME or --all, not both"),
        (["v1", "--state-dir", "."], "without --state-dir"),
        (["--all", "--direct"], "without --state-dir"),
        (["v1", "--shadow-verify", "h:1"], "without --state-dir"),
        (["--all", "--server", "s1"], "--server"),
        (["--state-dir", ".", "--manager", "http://m:1"], "--manager goes with VOLUME or --all"),
        (["v1", "--manager", "ftp://m"], "must be http://HOST:PORT"),
    ],
)
def test_usage_errors(args: list[str], said: str) -> None:
    code, out = run(*args)
    assert code == 2 and said in out, out


def test_no_manager_is_a_clear_error_with_exit_2(tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    for args in (["v1"], ["--all", "--repair"]):
        code, out = run(*args, "--manager", nobody)
        assert code == 2 and f"cannot reach the manager at {nobody}" in out, out
        assert "SHADOWBLK_MANAGER" in out


def report(*discrepancies: dict) -> dict:
    return {"volume": "v", "bytes_scanned": 8, "seconds": 0.5, "rebuilt_maps": [],
            "discrepancies": list(discrepancies), "repaired": 0, "unrepaired": 0,
            "record": "r", "exit_code": 0}  # fmt: skip


def found(side: str, block: int, repaired: bool) -> dict:
    return {"side": side, "block": block, "repaired": repaired, "offset": block * 4096}


def test_passes_merge_to_each_block_s_last_finding() -> None:
    first = report(found("primary", 3, False), found("shadow", 5, True))
    second = report(found("primary", 3, True), found("shadow", 5, False))
    merged = merge([("a:1", first), ("b:1", second)])
    assert [
        (d["side"], d["block"], d["repaired"], d["shadow"]) for d in merged["discrepancies"]
    ] == [
        ("primary", 3, True, None),
        ("shadow", 5, True, "a:1"),
        ("shadow", 5, False, "b:1"),
    ]
    assert (merged["repaired"], merged["unrepaired"], merged["exit_code"]) == (2, 1, 2)
    assert merged["bytes_scanned"] == 16 and merged["shadows"] == ["a:1", "b:1"]
    assert merge([(None, report())])["exit_code"] == 0
    assert merge([("a:1", report(found("primary", 1, True)))])["exit_code"] == 1
