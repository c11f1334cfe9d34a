"""The CLI skeleton: help, version, and doctor's JSON."""

import json
import subprocess

from shadowblk import __version__
from tests.procs import SHADOWBLK


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SHADOWBLK, *args], capture_output=True, text=True, timeout=60)


def test_help_lists_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    assert "doctor" in out.stdout


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0
    assert __version__ in out.stdout


def test_doctor_json_reports_built_fast_path() -> None:
    out = run("doctor", "--json")
    report = json.loads(out.stdout)
    assert report["native"] == dict.fromkeys(("bitmap", "blockcrc", "mutex", "nbdloop"), "built")
    assert report["ok"] is True
    assert out.returncode == 0


def test_unknown_command_is_a_clear_error() -> None:
    out = run("no-such-command")
    assert out.returncode == 2
    assert "No such command" in out.stderr
