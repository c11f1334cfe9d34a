"""The checksum compare before a planned promotion (docs/switchover.md): once the old primary
is fenced and its last epoch applied, the crc32c of the blocks dirtied since the last verify
(shadowblk/agent/dirty_check.py) are compared between the old primary and the shadow.

For a block that differs, the old primary's data is read and its crc set against the old
primary's map entry (the crc of what the VM wrote) and the shadow's data:

- old data = its map entry: the old primary holds the truth; the shadow's block is repaired
  from it (written durably, map entry set) before the promotion, and checked again;
- old data = the shadow's data: both copies agree, only the old primary's map entry is wrong
  (a `map` discrepancy on the old primary): nothing to repair;
- all three differ: no copy can be trusted: the promotion is aborted (`Mismatch`), and the
  volume waits for an operator (its old primary stays fenced).

Every block found wrong is in the record (`checksums`) and, for the shadow's, in the new
primary's discrepancy log (the failure predictor counts it). A compare that cannot run (no map
on a side, an agent without the calls) is recorded as `not-compared` and does not stop the
switchover: it is a check, not a step the promotion needs.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from shadowblk.agent.dirty_check import pack_blocks, unpack, unpack_blocks

log = logging.getLogger(__name__)

MAX_REPAIR_BLOCKS = 1024  # more than this (4 MiB of 4 KiB blocks) is not repaired in the pause
REPAIR_CHUNK = 32  # blocks per repair call (the control endpoint takes bodies up to 256 KiB)

Call = Callable[[str, str, str, dict], Awaitable[dict[str, Any]]]
"""The switchover's agent call: (control address, volume, call, body) -> the answer."""


class Mismatch(Exception):
    """Blocks that differ with no copy to trust: the promotion must not happen."""

    def __init__(self, message: str, checks: dict[str, Any]) -> None:
        super().__init__(message)
        self.checks = checks


async def before_promotion(
    call: Call, plan: dict[str, Any], name: str, before: int, after: int
) -> dict[str, Any]:
    """Compare NAME's dirty blocks on plan's old primary (generation BEFORE) and target (whose
    verified map is kept for generation AFTER); repair the target's; the record's `checksums`."""
    started = time.monotonic()
    old, new = plan["from_control"], plan["to_control"]
    try:
        dirty = await call(old, name, "dirty", {"generation": before})
        theirs = await call(new, name, "crcs", {"blocks": dirty["blocks"], "generation": after})
    except Exception as err:  # any refusal or failure of the calls: recorded, not fatal
        log.warning("%s: dirty blocks not compared before the promotion: %s", name, err)
        return {"result": "not-compared", "error": str(err)}
    blocks = unpack_blocks(dirty["blocks"], int(dirty["total"]))
    expected, actual = unpack(dirty["crcs"]), unpack(theirs["crcs"])
    bad = np.flatnonzero(expected != actual)
    checks: dict[str, Any] = {
        "scope": dirty["scope"],
        "blocks_compared": len(blocks),
        "blocks_total": int(dirty["total"]),
        "block_size": int(dirty["block_size"]),
        "mismatched": [int(b) for b in blocks[bad]],
        "result": "match",
    }
    if len(bad):
        checks["discrepancies"] = await _resolve(
            call, plan, name, checks, blocks[bad], expected[bad], actual[bad]
        )
    checks["ms"] = round((time.monotonic() - started) * 1000, 3)
    return checks


async def _resolve(
    call: Call,
    plan: dict[str, Any],
    name: str,
    checks: dict[str, Any],
    blocks: np.ndarray,
    expected: np.ndarray,
    actual: np.ndarray,
) -> list[dict[str, Any]]:
    """Repair the target's wrong blocks from the old primary; Mismatch if that cannot be."""
    old, new = plan["from_control"], plan["to_control"]
    if len(blocks) > MAX_REPAIR_BLOCKS:
        checks["result"] = "mismatch"
        raise Mismatch(f"{name}: {len(blocks)} blocks differ between {plan['from']} and "
                       f"{plan['to']}: more than the {MAX_REPAIR_BLOCKS} repaired in the pause",
                       checks)  # fmt: skip
    truth = await call(old, name, "blocks", {"blocks": blocks.tolist()})
    old_crcs = unpack(truth["crcs"])
    found, repair = [], []
    unresolved = []
    for i, block in enumerate(blocks.tolist()):
        d = {"block": block, "expected": int(expected[i]), "actual": int(actual[i])}
        if old_crcs[i] == expected[i]:
            repair.append(i)
            found.append({**d, "server": plan["to"], "side": "shadow", "kind": "data"})
        elif old_crcs[i] == actual[i]:
            found.append({**d, "server": plan["from"], "side": "primary", "kind": "map",
                          "repaired": False})  # fmt: skip
        else:
            unresolved.append(block)
            found.append({**d, "server": plan["to"], "side": "both", "kind": "unresolved",
                          "repaired": False, "old_primary_data": int(old_crcs[i])})  # fmt: skip
    if unresolved:
        checks["result"] = "mismatch"
        checks["discrepancies"] = found
        raise Mismatch(f"{name}: blocks {unresolved[:20]} differ between {plan['from']} and "
                       f"{plan['to']}, and the old primary's data matches neither its map nor "
                       "the shadow: no copy to trust, not promoted", checks)  # fmt: skip
    data = base64.b64decode(truth["data"])
    bs = checks["block_size"]
    for start in range(0, len(repair), REPAIR_CHUNK):
        part = repair[start : start + REPAIR_CHUNK]
        body = {
            "blocks": [int(blocks[i]) for i in part],
            "data": base64.b64encode(b"".join(data[i * bs : (i + 1) * bs] for i in part)).decode(),
        }
        await call(new, name, "repair", body)
    if repair:
        fixed = blocks[repair]
        again = await call(
            new, name, "crcs", {"blocks": pack_blocks(fixed, checks["blocks_total"])}
        )
        if not np.array_equal(unpack(again["crcs"]), expected[repair]):
            checks["result"] = "mismatch"
            checks["discrepancies"] = found
            raise Mismatch(f"{name}: the repaired blocks of {plan['to']} still differ", checks)
    for d in found:
        d.setdefault("repaired", True)
    checks["result"] = "repaired" if repair else "map-mismatch"
    checks["repaired"] = len(repair)
    log.error("%s: %d blocks differed between %s and %s before the promotion: %s", name,
              len(blocks), plan["from"], plan["to"], found[:10])  # fmt: skip
    return found


async def log_found(call: Call, plan: dict[str, Any], name: str, checks: dict[str, Any]) -> None:
    """Put the promoted shadow's wrong blocks in its discrepancy log (after the promotion: the
    log lives in the new primary's state folder)."""
    mine = [d for d in checks.get("discrepancies", []) if d["server"] == plan["to"]]
    if not mine:
        return
    body = {"block_size": checks["block_size"], "discrepancies": mine}
    try:
        await call(plan["to_control"], name, "discrepancies", body)
    except Exception as err:  # the record has them anyway
        log.warning("%s: discrepancies not logged on %s: %s", name, plan["to"], err)
