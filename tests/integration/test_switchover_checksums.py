"""The checksum compare before a planned promotion: the blocks dirtied since the last verify are
compared between the fenced old primary and the shadow (the shadow's *data*, not only its map);
a clean switchover records the compare; a byte flipped on the shadow's disk in a dirtied block
is caught before the promotion and repaired from the old primary; a block no copy holds right
aborts the promotion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shadowblk.manager.client import ManagerError
from tests.agent_lab import agent_groups_fixture, wait_for  # noqa: F401
from tests.integration.test_manager_cli import shadowblk
from tests.integration.test_switchover_planned import qemu_io
from tests.procs import Processes
from tests.switchover_lab import Fleet, start_attach, start_fleet

BLOCK = 4096


def fleet_with_attach(
    procs: Processes, groups: list[int], tmp_path: Path, block_size: int = BLOCK
) -> Fleet:
    fleet = start_fleet(procs, groups, tmp_path, block_size=block_size)
    start_attach(procs, fleet)
    return fleet


def holds(image: Path, offset: int, byte: int) -> bool:
    """IMAGE's byte at OFFSET is BYTE (the shadow applied the write)."""
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(1) == bytes([byte])


def flip(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0x01]))


def test_a_clean_switchover_compares_the_blocks_dirtied_since_the_last_verify(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    fleet = fleet_with_attach(procs, agent_groups, tmp_path)
    qemu_io(fleet.attach_uri, "write -P 0x61 0 1M")
    first = fleet.switchover(to="s2")
    checks = first["checksums"]
    assert first["outcome"] == "succeeded", first
    # never verified before: every block written since the volume was created (256 of 4 KiB)
    assert checks["result"] == "match" and checks["scope"] == "since-created", checks
    assert checks["blocks_compared"] == 256 and checks["mismatched"] == [], checks
    assert "compare_ms" in first["timings_ms"] and "precompare_ms" in first["timings_ms"]
    # read before the pause; in it, only what was written since (nothing here)
    assert checks["in_pause"] == {"changed": 0, "compared": 0, "not_compared": 0}, checks
    assert not checks["partial"], checks

    qemu_io(fleet.attach_uri, "write -P 0x62 4M 64k")  # on s2 now: 16 blocks
    wait_for(fleet.in_step, 60, "s1 a shadow of s2 again, in step")
    back = fleet.switchover(to="s1")
    checks = back["checksums"]
    assert back["outcome"] == "succeeded", back
    # s2 was verified when it was promoted: only what was written since is compared
    assert checks["result"] == "match" and checks["scope"] == "since-verify", checks
    assert checks["blocks_compared"] == 16, checks
    qemu_io(fleet.attach_uri, "read -P 0x61 0 1M")
    qemu_io(fleet.attach_uri, "read -P 0x62 4M 64k")
    recorded = fleet.client.call("GET", "/v1/switchovers", volume="v1")["switchovers"]
    assert [r["checksums"]["blocks_compared"] for r in recorded] == [256, 16]


def test_a_flipped_byte_on_the_shadow_is_caught_and_repaired_before_the_promotion(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    fleet = fleet_with_attach(procs, agent_groups, tmp_path)
    qemu_io(fleet.attach_uri, "write -P 0x71 0 1M")
    shadow_image = tmp_path / "s2" / "shadows" / "v1.img"
    offset = 37 * BLOCK + 123  # in block 37, which the write dirtied
    wait_for(lambda: holds(shadow_image, offset, 0x71), 60, "the write applied on s2")
    flip(shadow_image, offset)  # the shadow's disk rots; its map still has the right crc

    record = fleet.switchover(to="s2")
    checks = record["checksums"]
    assert record["outcome"] == "succeeded", record
    assert checks["mismatched"] == [37] and checks["result"] == "repaired", checks
    assert checks["repaired"] == 1, checks
    (found,) = checks["discrepancies"]
    assert (found["server"], found["side"], found["kind"], found["repaired"]) == (
        "s2",
        "shadow",
        "data",
        True,
    )
    # the promoted copy holds what the VM wrote, and the discrepancy is in s2's log
    assert holds(tmp_path / "s2" / "primaries" / "v1.img", offset, 0x71)
    qemu_io(fleet.attach_uri, "read -P 0x71 0 1M")
    log = tmp_path / "s2" / "primaries" / "v1.state" / "discrepancies.jsonl"
    (line,) = log.read_text().splitlines()
    assert json.loads(line)["block"] == 37


def test_a_block_that_no_copy_holds_right_aborts_the_promotion(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    fleet = fleet_with_attach(procs, agent_groups, tmp_path)
    qemu_io(fleet.attach_uri, "write -P 0x72 0 256k")
    offset = 5 * BLOCK
    wait_for(
        lambda: holds(tmp_path / "s2" / "shadows" / "v1.img", offset, 0x72),
        60,
        "the write applied on s2",
    )
    flip(tmp_path / "s1" / "primaries" / "v1.img", offset)  # the old primary's disk rots too,
    flip(tmp_path / "s2" / "shadows" / "v1.img", offset + 1)  # and differently
    with pytest.raises(ManagerError) as err:
        fleet.switchover(to="s2")
    assert err.value.status == 502 and "aborted" in str(err.value), err.value
    record = fleet.client.call("GET", "/v1/switchovers", volume="v1")["switchovers"][-1]
    assert record["outcome"] == "aborted", record
    assert record["checksums"]["result"] == "mismatch", record
    assert record["checksums"]["mismatched"] == [5], record
    assert "promote_ms" not in record["timings_ms"]  # never promoted
    assert not (tmp_path / "s2" / "primaries" / "v1.img").exists()
    # blocked until an operator decides: nothing promotes the rejected copy meanwhile
    volume = fleet.client.volume("v1")
    assert "aborted" in volume["blocked"], volume
    shown = shadowblk(fleet.lab, "volume", "show", "v1")
    assert shown.returncode == 0 and "BLOCKED     switchover to s2 aborted" in shown.stdout, shown
    with pytest.raises(ManagerError) as again:
        fleet.switchover(to="s2")
    assert again.value.status == 409 and "blocked" in str(again.value), again.value
    host = [e for e in fleet.client.events(0, 1000)
            if e["kind"] == "host-volume" and e["detail"]["role"] == "primary"]  # fmt: skip
    assert [e["detail"]["server"] for e in host] == ["s1"]  # the creation's order only

    # the operator's decision: the store's primary (s2) is the copy after all
    done = shadowblk(fleet.lab, "volume", "unblock", "v1")
    assert done.returncode == 0 and "unblocked v1: primary s2" in done.stdout, done
    assert fleet.client.volume("v1")["blocked"] == ""
    host = [e for e in fleet.client.events(0, 1000)
            if e["kind"] == "host-volume" and e["detail"]["role"] == "primary"]  # fmt: skip
    assert [e["detail"]["server"] for e in host] == ["s1", "s2"]
    again = shadowblk(fleet.lab, "volume", "unblock", "v1")
    assert again.returncode != 0 and "v1 is not blocked" in again.stderr, again


def test_a_repair_of_large_blocks_in_many_calls(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    """64 KiB blocks, 8 of them rotted on the shadow: 512 KiB of data to repair, more than the
    agent takes in one call."""
    bs = 64 * 1024
    fleet = fleet_with_attach(procs, agent_groups, tmp_path, block_size=bs)
    qemu_io(fleet.attach_uri, "write -P 0x73 0 1M")
    shadow_image = tmp_path / "s2" / "shadows" / "v1.img"
    wait_for(lambda: holds(shadow_image, 15 * bs + 9, 0x73), 60, "the write applied on s2")
    rotted = [2, 3, 5, 7, 11, 12, 13, 15]
    for block in rotted:
        flip(shadow_image, block * bs + 9)
    record = fleet.switchover(to="s2")
    checks = record["checksums"]
    assert record["outcome"] == "succeeded", record
    assert checks["mismatched"] == rotted and checks["result"] == "repaired", checks
    qemu_io(fleet.attach_uri, "read -P 0x73 0 1M")
