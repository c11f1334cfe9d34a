"""The manager's side of the checksum compare before a planned promotion, over the agents' real
dirty_check calls on real image and map files: the bulk is read before the pause and only the
rest in it, bounded; a repair that fails midway aborts (never a half-repaired promotion); the
repair calls stay under the agent's body limit whatever the block size."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shadowblk.agent import dirty_check
from shadowblk.agent.control import MAX_BODY
from shadowblk.integrity.checksum_map import ChecksumMap
from shadowblk.manager import dirty_compare
from shadowblk.manager.switchover import StepFailed

BLOCKS = 64
BEFORE, AFTER = 1, 2
PLAN = {"from": "s1", "to": "s2", "from_control": "old", "to_control": "new"}


class Agents:
    """The two agents' compare calls, on OLD's primary and NEW's shadow; a body over the
    control endpoint's limit is refused as the agent does (400); FAIL: call -> the nth such
    call (from 1) fails."""

    def __init__(self, root: Path, bs: int) -> None:
        self.old, self.new, self.bs = root / "old", root / "new", bs
        (self.old / "primaries" / "v.state").mkdir(parents=True)
        (self.new / "shadows").mkdir(parents=True)
        self.old_image.write_bytes(bytes(BLOCKS * bs))
        self.fail: dict[str, int] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.write([3, 9], 0x33)

    @property
    def old_image(self) -> Path:
        return self.old / "primaries" / "v.img"

    @property
    def new_image(self) -> Path:
        return self.new / "shadows" / "v.img"

    def write(self, blocks: list[int], byte: int, shipped: bool = True) -> None:
        """The VM writes BLOCKS on the old primary; SHIPPED: applied on the shadow too."""
        with open(self.old_image, "r+b") as f:
            for block in blocks:
                f.seek(block * self.bs)
                f.write(bytes([byte]) * self.bs)
        ChecksumMap.build(self.old_image, self.old / "primaries" / "v.state" / "checksums.map",
                          self.bs).close()  # fmt: skip
        if shipped:
            shutil.copy(self.old_image, self.new_image)
            ChecksumMap.build(self.new_image, self.new / "shadows" / "v.map", self.bs).close()

    def rot(self, blocks: list[int]) -> None:
        """The shadow's disk rots in BLOCKS (its map keeps the right crcs)."""
        with open(self.new_image, "r+b") as f:
            for block in blocks:
                f.seek(block * self.bs + 7)
                f.write(b"\xee")

    async def __call__(self, address: str, name: str, call: str, body: dict) -> dict[str, Any]:
        self.calls.append((call, body))
        if len(json.dumps(body)) > MAX_BODY:
            raise StepFailed(f"{call} at {address}: a body of 0 to {MAX_BODY} bytes is required")
        if self.fail.get(call) == sum(c == call for c, _ in self.calls):
            raise StepFailed(f"{call} at {address}: ConnectionResetError")
        if call == "dirty":
            since = body.get("since") == "seen"
            keep = bool(body.get("keep"))
            return dirty_check.primary_dirty(self.old, name, body["generation"], keep, since)
        if call == "crcs":
            return dirty_check.shadow_crcs(self.new, name, body)
        if call == "blocks":
            return dirty_check.read_blocks(self.old, name, body["blocks"])
        assert call == "repair"
        return dirty_check.repair(self.new, name, body)

    def read_in_pause(self) -> list[int]:
        """The blocks the shadow's `crcs` calls read since the calls were last cleared."""
        found = [dirty_check.unpack_blocks(b["blocks"], BLOCKS) for c, b in self.calls
                 if c == "crcs"]  # fmt: skip
        return sorted(int(x) for part in found for x in part)

    def compare(self) -> dict[str, Any]:
        """The two parts, with the pause between them; the record's checksums."""
        early = asyncio.run(dirty_compare.before_pause(self, PLAN, "v", BEFORE))
        self.calls.clear()
        return asyncio.run(dirty_compare.in_pause(self, PLAN, "v", BEFORE, AFTER, early))


@pytest.fixture
def agents(tmp_path: Path) -> Agents:
    return Agents(tmp_path, 4096)


def verified(agents: Agents) -> bool:
    """The shadow's map was kept as the verified one of generation AFTER."""
    path = agents.new / "verified" / "v.npz"
    return path.exists() and int(np.load(path)["generation"]) == AFTER


def test_the_bulk_is_read_before_the_pause_and_only_what_changed_in_it(agents: Agents) -> None:
    early = asyncio.run(dirty_compare.before_pause(agents, PLAN, "v", BEFORE))
    assert early.checks["blocks_compared"] == 2 and not len(early.suspects)
    agents.write([20, 21], 0x44)  # the last drain round and the final epoch
    agents.calls.clear()
    checks = asyncio.run(dirty_compare.in_pause(agents, PLAN, "v", BEFORE, AFTER, early))
    assert checks["result"] == "match" and not checks["partial"], checks
    assert checks["in_pause"] == {"changed": 2, "compared": 2, "not_compared": 0}, checks
    assert agents.read_in_pause() == [20, 21]  # blocks 3 and 9 are not read again
    assert verified(agents)


def test_a_block_wrong_before_the_pause_is_compared_again_and_repaired(agents: Agents) -> None:
    agents.rot([9])
    checks = agents.compare()
    assert checks["before_pause"]["differed"] == 1, checks
    assert checks["mismatched"] == [9] and checks["result"] == "repaired", checks
    assert agents.compare()["result"] == "match"  # the shadow's block holds the VM's data


@pytest.mark.parametrize("bs", [8192, 65536])
def test_repairs_of_large_blocks_stay_under_the_agents_body_limit(tmp_path: Path, bs: int) -> None:
    agents = Agents(tmp_path, bs)
    bad = list(range(10, 50))
    agents.write(bad, 0x55)
    agents.rot(bad)
    checks = agents.compare()
    assert checks["result"] == "repaired" and checks["repaired"] == len(bad), checks
    assert sum(c == "repair" for c, _ in agents.calls) >= 2
    assert agents.compare()["result"] == "match"


@pytest.mark.parametrize("call", ["blocks", "repair"])
def test_a_repair_that_fails_midway_aborts(tmp_path: Path, call: str) -> None:
    agents = Agents(tmp_path, 8192)
    bad = list(range(10, 50))
    agents.write(bad, 0x55)
    agents.rot(bad)
    agents.fail[call] = 1 if call == "blocks" else 2  # the second repair call: some repaired
    with pytest.raises(dirty_compare.Mismatch) as err:
        agents.compare()
    assert err.value.checks["result"] == "repair-failed", err.value.checks
    assert "ConnectionResetError" in err.value.checks["error"]


def test_a_block_wrong_before_the_pause_that_cannot_be_read_again_aborts(agents: Agents) -> None:
    agents.rot([3])
    early = asyncio.run(dirty_compare.before_pause(agents, PLAN, "v", BEFORE))
    agents.calls.clear()
    agents.fail["crcs"] = 1
    with pytest.raises(dirty_compare.Mismatch):
        asyncio.run(dirty_compare.in_pause(agents, PLAN, "v", BEFORE, AFTER, early))


def test_a_quiet_compare_that_cannot_finish_is_not_fatal(agents: Agents) -> None:
    early = asyncio.run(dirty_compare.before_pause(agents, PLAN, "v", BEFORE))
    agents.fail["dirty"] = 2  # the one in the pause
    checks = asyncio.run(dirty_compare.in_pause(agents, PLAN, "v", BEFORE, AFTER, early))
    assert checks["result"] == "not-compared" and not verified(agents), checks


def test_the_part_in_the_pause_is_bounded(agents: Agents, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirty_compare, "PAUSE_BYTES", 4 * agents.bs)
    agents.rot([9])
    early = asyncio.run(dirty_compare.before_pause(agents, PLAN, "v", BEFORE))
    agents.write(list(range(30, 40)), 0x66)  # 10 blocks shipped after the compare began
    agents.rot([9])  # (the copy undid the first rot)
    agents.calls.clear()
    checks = asyncio.run(dirty_compare.in_pause(agents, PLAN, "v", BEFORE, AFTER, early))
    assert checks["partial"], checks
    assert checks["in_pause"] == {"changed": 10, "compared": 4, "not_compared": 7}, checks
    assert 9 in agents.read_in_pause()  # what differed before the pause is read first
    assert checks["mismatched"] == [9] and checks["result"] == "repaired", checks
    assert not verified(agents)  # a partial compare is no verify: the next one starts over
