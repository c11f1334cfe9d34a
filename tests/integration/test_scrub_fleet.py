"""`shadowblk scrub VOLUME` and `scrub --all` through a real fleet: a manager and two agents as
processes, a volume with its primary on s1 and its shadow on s2 (whose verify port the agent
registered), data written through the primary's NBD export with qemu-io, bytes flipped in the
primary's backing file and then in the shadow's image: found on the right side, repaired from
the good one, the data read back through NBD; a clean fleet exits 0; a progress bar per volume
on a terminal; an unknown volume, a wrong token and a primary's agent gone are clear errors
(usage errors and a missing manager: tests/unit/test_scrub_fleet_cli.py)."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
from contextlib import suppress
from pathlib import Path

from tests.agent_lab import agent_groups_fixture, serving, wait_for  # noqa: F401 - the fixture
from tests.integrity_lab import BS, flip, read_block
from tests.procs import SHADOWBLK, Processes
from tests.switchover_lab import Fleet, MiB, start_fleet

PRIMARY_BLOCK, SHADOW_BLOCK = 100, 700  # both in written regions, each its own pattern


def qemu_io(url: str, command: str) -> str:
    """Run one qemu-io command on URL; its output (fails the test if qemu-io fails)."""
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", command, url], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "fail" not in out.stdout.lower(), out.stdout + out.stderr
    return out.stdout


def scrub(fleet: Fleet, *args: str) -> tuple[int, str, str]:
    """`shadowblk scrub ARGS` against the fleet's manager: exit code, stdout, stderr."""
    argv = [*SHADOWBLK, "scrub", *args, "--manager", fleet.lab.url,
            "--token-file", str(fleet.lab.token_file)]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout, out.stderr


def scrub_json(fleet: Fleet, *args: str) -> tuple[int, dict]:
    code, out, err = scrub(fleet, *args, "--json")
    assert out.startswith("{"), out + err
    return code, json.loads(out)


def scrub_on_a_terminal(fleet: Fleet, *args: str) -> tuple[int, str, bytes]:
    """`shadowblk scrub ARGS` with stderr a terminal: exit code, stdout, what the terminal got."""
    argv = [*SHADOWBLK, "scrub", *args, "--manager", fleet.lab.url,
            "--token-file", str(fleet.lab.token_file)]  # fmt: skip
    leader, follower = pty.openpty()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=follower, text=True) as proc:
        os.close(follower)
        out, _ = proc.communicate(timeout=120)
    shown = b""
    with suppress(OSError):  # EIO once the terminal's other end is closed and drained
        while chunk := os.read(leader, 4096):
            shown += chunk
    os.close(leader)
    return proc.returncode, out, shown


def sides(doc: dict) -> list[tuple[str, int, bool]]:
    return sorted((d["side"], d["block"], d["repaired"]) for d in doc["discrepancies"])


def test_scrub_a_volume_of_the_fleet(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    fleet = start_fleet(procs, agent_groups, tmp_path, size=16 * MiB)
    client = fleet.client
    verify = client.server("s2")["verify_address"]
    assert verify.startswith("127.0.0.1:") and not verify.endswith(":0")
    url = wait_for(lambda: serving(client, "s1", "v1"), 30, "v1 served")["endpoint"]
    qemu_io(url, f"write -P 0x5a {PRIMARY_BLOCK * BS} {8 * BS}")
    qemu_io(url, f"write -P 0xa5 {SHADOW_BLOCK * BS} {8 * BS}")
    primary_image = fleet.dirs["s1"] / "primaries" / "v1.img"
    shadow_image = fleet.dirs["s2"] / "shadows" / "v1.img"
    wanted = {PRIMARY_BLOCK: b"\x5a" * BS, SHADOW_BLOCK: b"\xa5" * BS}
    for block, data in wanted.items():
        wait_for(lambda b=block, d=data: read_block(shadow_image, b) == d, 30, "shipped")

    # a clean fleet: every volume scrubbed, exit 0
    code, doc = scrub_json(fleet, "--all")
    assert code == 0, doc
    (report,) = doc["volumes"]
    assert report["volume"] == "v1" and report["discrepancies"] == []
    assert report["shadows"] == [verify] and report["bytes_scanned"] == 2 * 16 * MiB

    # rot in the primary's backing file: found on the primary, repaired from the shadow
    flip(primary_image, PRIMARY_BLOCK)
    code, doc = scrub_json(fleet, "v1", "--repair", "--rate", "500")
    assert code == 1, doc
    assert sides(doc) == [("primary", PRIMARY_BLOCK, True)]
    assert doc["discrepancies"][0]["server"] == "s1"
    assert read_block(primary_image, PRIMARY_BLOCK) == wanted[PRIMARY_BLOCK]
    qemu_io(url, f"read -P 0x5a {PRIMARY_BLOCK * BS} {8 * BS}")  # read back through NBD
    records = (fleet.dirs["s1"] / "primaries" / "v1.state" / "discrepancies.jsonl").read_text()
    assert json.loads(records.splitlines()[-1])["side"] == "primary"

    # rot in the shadow's image: found on the shadow, shipped again from the primary
    flip(shadow_image, SHADOW_BLOCK)
    code, doc = scrub_json(fleet, "v1", "--repair")
    assert code == 1, doc
    assert sides(doc) == [("shadow", SHADOW_BLOCK, True)]
    assert doc["discrepancies"][0]["shadow"] == verify
    wait_for(lambda: read_block(shadow_image, SHADOW_BLOCK) == wanted[SHADOW_BLOCK], 30,
             "the shadow's block shipped again")  # fmt: skip
    qemu_io(url, f"read -P 0xa5 {SHADOW_BLOCK * BS} {8 * BS}")

    # found and not repaired (no --repair): exit 2, the text names the side; on a terminal,
    # a progress bar per volume
    flip(primary_image, PRIMARY_BLOCK)
    code, out, shown = scrub_on_a_terminal(fleet, "--all")
    assert code == 2 and f"block {PRIMARY_BLOCK} " in out and "NOT repaired" in out, out
    assert "1 volume(s): 1 found, not repaired" in out, out
    assert b"scrub v1" in shown and b"100%" in shown, shown
    code, _, _ = scrub(fleet, "--all", "--repair")
    assert code == 1
    assert read_block(primary_image, PRIMARY_BLOCK) == wanted[PRIMARY_BLOCK]

    # clear errors: an unknown volume, a wrong token, the primary's agent gone
    code, out, err = scrub(fleet, "nosuch")
    assert code == 2 and out == "" and "nosuch" in err and "error:" in err, err
    argv = [*SHADOWBLK, "scrub", "v1", "--manager", fleet.lab.url]  # a wrong token: refused
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "SHADOWBLK_TOKEN": "wrong"})  # fmt: skip
    assert out.returncode == 2 and "token" in out.stderr, out.stderr
    os.killpg(fleet.agents["s1"].pid, signal.SIGKILL)  # the primary's agent and its children
    code, out, err = scrub(fleet, "--all")
    said = ("v1" in err and "s1" in err) and ("cannot be reached" in err or "is not up" in err)
    assert code == 2 and said, err  # refused at once, or down once the heartbeats stopped
