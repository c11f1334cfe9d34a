"""The checksum compare before a planned promotion (docs/switchover.md), in two parts.

Before the pause (the old primary still takes writes, its shadows just drained): the crc32c of
the blocks dirtied since the last verify (shadowblk/agent/dirty_check.py), the old primary's
map entries against the shadow's data; the old primary keeps the map it answered. Most of the
reading happens here, outside the VM's pause, however many blocks were dirtied.

In the pause (the old primary fenced, its last epoch applied): only the blocks whose entry
changed since that kept map, and those that differed before the pause (a write in flight, or a
wrong block), at most PAUSE_BYTES of data read in at most PAUSE_S: past that bound the compare
is `partial` (recorded; the rest is not compared).

For a block that still differs, the old primary's data is read and its crc set against the old
primary's map entry (the crc of what the VM wrote) and the shadow's data:

- old data = its map entry: the old primary holds the truth; the shadow's block is repaired
  from it (written durably, map entry set) before the promotion, and checked again;
- old data = the shadow's data: both copies agree, only the old primary's map entry is wrong
  (a `map` discrepancy on the old primary): nothing to repair;
- all three differ, or the repair fails for any reason: the promotion is aborted (`Mismatch`),
  and the volume waits for an operator (its old primary stays fenced).

Every block found wrong is in the record (`checksums`) and, for the shadow's, in the new
primary's discrepancy log (the failure predictor counts it). A compare that cannot run (no map
on a side, an agent without the calls) is recorded as `not-compared` and does not stop the
switchover: it is a check, not a step the promotion needs; but once blocks were found to differ
before the pause, a compare that cannot finish in the pause aborts.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shadowblk.agent.dirty_check import pack_blocks, unpack, unpack_blocks

log = logging.getLogger(__name__)

MAX_REPAIR_BLOCKS = 1024  # more than this is not repaired in the pause
REPAIR_BYTES = 128 * 1024  # data per repair call: in base64, well under the agent's 256 KiB body
CHUNK_BYTES = 64 << 20  # data read per `crcs` call before the pause (each has its own timeout)
PAUSE_BYTES = 16 << 20  # data read in the pause at most ...
PAUSE_S = 2.0  # ... and for this long at most (checked between calls)
PAUSE_CHUNK_BYTES = 2 << 20  # data read per `crcs` call in the pause

Call = Callable[[str, str, str, dict], Awaitable[dict[str, Any]]]
"""The switchover's agent call: (control address, volume, call, body) -> the answer."""

_NONE = np.empty(0, dtype=np.int64)


class Mismatch(Exception):
    """Blocks that differ with no copy to trust, or a repair that failed: the promotion must
    not happen."""

    def __init__(self, message: str, checks: dict[str, Any]) -> None:
        super().__init__(message)
        self.checks = checks


@dataclass
class Early:
    """The compare before the pause: its record, and the blocks that differed then."""

    checks: dict[str, Any]
    suspects: np.ndarray = field(default_factory=lambda: _NONE)
    expected: np.ndarray = field(default_factory=lambda: _NONE)  # their old-primary crcs then

    @property
    def compared(self) -> bool:
        return "scope" in self.checks


async def _crcs(
    call: Call, address: str, name: str, blocks: np.ndarray, total: int, bs: int, chunk: int,
    deadline: float | None = None, keep: int | None = None,
) -> tuple[np.ndarray, bool]:  # fmt: skip
    """The target's data crcs of BLOCKS (sorted), CHUNK bytes of data per call; stops early
    (a shorter answer) once past DEADLINE. With KEEP, the last call also has the target keep
    its map as the verified one of generation KEEP (no call of its own in the pause); whether
    that call was made."""
    per = max(1, chunk // bs)
    out, kept = [np.empty(0, dtype="<u4")], False
    for start in range(0, len(blocks), per):
        if deadline is not None and time.monotonic() > deadline:
            break
        part = blocks[start : start + per]
        body: dict[str, Any] = {"blocks": pack_blocks(part, total)}
        if keep is not None and start + per >= len(blocks):
            body["generation"], kept = keep, True
        got = await call(address, name, "crcs", body)
        out.append(unpack(got["crcs"]))
    return np.concatenate(out), kept


async def before_pause(call: Call, plan: dict[str, Any], name: str, before: int) -> Early:
    """Compare NAME's blocks dirtied since the last verify on plan's old primary (generation
    BEFORE, still serving) and target, before the VM's pause; the old primary keeps its map."""
    started = time.monotonic()
    old, new = plan["from_control"], plan["to_control"]
    try:
        dirty = await call(old, name, "dirty", {"generation": before, "keep": True})
        total, bs = int(dirty["total"]), int(dirty["block_size"])
        blocks = unpack_blocks(dirty["blocks"], total)
        actual, _ = await _crcs(call, new, name, blocks, total, bs, CHUNK_BYTES)
        expected = unpack(dirty["crcs"])
        bad = np.flatnonzero(expected != actual)
    except Exception as err:  # any refusal or failure of the calls: recorded, not fatal
        log.warning("%s: dirty blocks not compared before the promotion: %s", name, err)
        return Early({"result": "not-compared", "error": str(err)})
    checks = {
        "scope": dirty["scope"],
        "blocks_compared": len(blocks),
        "blocks_total": total,
        "block_size": bs,
        "before_pause": {"differed": len(bad), "ms": _ms(started)},
    }
    return Early(checks, blocks[bad], expected[bad])


async def in_pause(
    call: Call, plan: dict[str, Any], name: str, before: int, after: int, early: Early,
    changed: dict[str, Any] | None = None, handover: asyncio.Future | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The end of the compare, the old primary fenced: the blocks changed since EARLY and those
    that differed then; repair the target's (whose verified map is kept for generation AFTER,
    unless the compare is partial); the record's `checksums`. CHANGED: the old primary's
    `dirty` since seen answer, if the fence's answer brought it (one call less). HANDOVER: the
    target's shadow server letting go of the volume, running beside the compare: a repair
    waits for it, so that it writes a map nobody else holds and stamps its header (a repair
    under a closed map's old header would make the new primary rebuild the map from the whole
    image, in the pause); its failure is the caller's to see."""
    started = time.monotonic()
    checks = dict(early.checks)
    if not early.compared:
        return checks
    old, new = plan["from_control"], plan["to_control"]
    total, bs = checks["blocks_total"], checks["block_size"]
    try:
        if changed is None:
            changed = await call(old, name, "dirty", {"generation": before, "since": "seen"})
        moved = unpack_blocks(changed["blocks"], total)
        expected = dict(zip(early.suspects.tolist(), early.expected.tolist(), strict=True))
        expected.update(zip(moved.tolist(), unpack(changed["crcs"]).tolist(), strict=True))
        wanted = list(dict.fromkeys([*early.suspects.tolist(), *moved.tolist()]))  # suspects 1st
        chosen = np.array(sorted(wanted[: max(1, PAUSE_BYTES // bs)]), dtype=np.int64)
        # not partial: the target's map becomes the verified one of its generation (AFTER)
        keep = after if len(chosen) == len(wanted) else None
        actual, kept = await _crcs(
            call, new, name, chosen, total, bs, PAUSE_CHUNK_BYTES, started + PAUSE_S, keep
        )
        compared = chosen[: len(actual)]
        partial = len(compared) < len(wanted)
        if not partial and not kept:  # nothing to compare: kept all the same
            await call(new, name, "crcs", {"blocks": pack_blocks(_NONE, total),
                                           "generation": after})  # fmt: skip
        want = np.array([expected[b] for b in compared.tolist()], dtype="<u4")
        bad = np.flatnonzero(want != actual)
    except Exception as err:
        if not len(early.suspects):  # nothing was seen wrong: a check that could not finish
            log.warning("%s: dirty blocks not compared in the pause: %s", name, err)
            return {**checks, "result": "not-compared", "error": str(err)}
        checks.update(result="not-compared", error=str(err))
        raise Mismatch(f"{name}: {len(early.suspects)} blocks differed between {plan['from']} "
                       f"and {plan['to']} before the pause and could not be compared again: "
                       f"{err}: not promoted", checks) from None  # fmt: skip
    checks.update(
        mismatched=[int(b) for b in compared[bad]],
        result="match",
        partial=partial,
        in_pause={"changed": len(moved), "compared": len(compared),
                  "not_compared": len(wanted) - len(compared)},
    )  # fmt: skip
    if partial:
        log.warning("%s: the compare in the pause stopped at its bound: %d blocks not compared",
                    name, len(wanted) - len(compared))  # fmt: skip
    if len(bad):
        if handover is not None:
            await asyncio.gather(handover, return_exceptions=True)
        try:
            checks["discrepancies"] = await _resolve(
                call, plan, name, checks, compared[bad], want[bad], actual[bad]
            )
        except Mismatch:
            raise
        except Exception as err:  # a repair half done is no repair: never promoted
            checks.update(result="repair-failed", error=str(err))
            raise Mismatch(f"{name}: the repair of {plan['to']}'s wrong blocks failed: {err}: "
                           "not promoted", checks) from None  # fmt: skip
    checks["ms"] = _ms(started)
    return checks


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)


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
    per = max(1, REPAIR_BYTES // bs)
    for start in range(0, len(repair), per):
        part = repair[start : start + per]
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
