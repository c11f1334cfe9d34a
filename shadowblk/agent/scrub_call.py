"""The agent's `scrub` call: the live scrub of a primary volume this server hosts, and of its
shadows over their verify ports (docs/integrity.md, "Scrub a fleet").

The volume's `serve` runs each scrub (its STATE_DIR/scrub.sock, shadowblk.nbd.scrub_control);
it takes one shadow per run, so a volume with several shadows is scrubbed once per shadow and
the reports are merged: a block's last finding wins (a primary block left bad by one pass and
repaired from the next shadow is repaired). Progress counts bytes over all passes.

    POST /v1/volumes/NAME/scrub {"repair": B, "rate": BYTES_PER_S | null,
                                 "shadows": ["HOST:PORT", ...], "server": NAME | null}

answers JSON lines: progress `{"phase", "done", "total"}`, then `{"report": {...}}` or
`{"error": "why"}`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shadowblk.agent.switch import SwitchError
from shadowblk.nbd import scrub_control

if TYPE_CHECKING:
    from shadowblk.agent.hosting import Hosting

MAX_SHADOWS = 16


def _request(body: dict[str, Any]) -> tuple[dict[str, Any], list[str | None]]:
    """The request for `serve` and the shadows to pass it, or ValueError naming the field."""
    repair, rate = body.get("repair", False), body.get("rate")
    shadows, server = body.get("shadows", []), body.get("server")
    if not isinstance(repair, bool):
        raise ValueError("repair: true or false")
    if rate is not None and (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise ValueError("rate: a positive number of bytes/s, or null")
    if (
        not isinstance(shadows, list)
        or len(shadows) > MAX_SHADOWS
        or not all(isinstance(s, str) for s in shadows)
    ):
        raise ValueError(f"shadows: a list of up to {MAX_SHADOWS} HOST:PORT verify addresses")
    if server is not None and not isinstance(server, str):
        raise ValueError("server: the name in the records, or null")
    request = {"op": "scrub", "repair": repair, "rate": rate, "server": server}
    return request, list(shadows) or [None]


def start(hosting: Hosting, name: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Check the call (ValueError: bad request; SwitchError: no primary of NAME here) before
    anything is answered; then the lines to stream."""
    request, shadows = _request(body)
    for shadow in shadows:  # the serve's own checks, before the answer's status is sent
        scrub_control.parse_request(json.dumps({**request, "shadow": shadow}).encode())
    with hosting.lock:
        rec = hosting.volumes.get(name)
        if rec is None or rec["role"] != "primary":
            raise SwitchError(f"{name}: no primary of it here")
    return _passes(hosting.primaries_dir / f"{name}.state", request, shadows)


def _passes(
    state_dir: Path, request: dict[str, Any], shadows: list[str | None]
) -> Iterator[dict[str, Any]]:
    """One scrub by the `serve` of STATE_DIR per shadow; its lines, then the merged report."""
    reports: list[tuple[str | None, dict[str, Any]]] = []
    base = 0  # bytes scanned by the passes before this one
    for shadow in shadows:
        try:
            with closing(scrub_control.ask(state_dir, {**request, "shadow": shadow})) as answers:
                for answer in answers:
                    if "report" in answer:
                        reports.append((shadow, answer["report"]))
                        break
                    if "error" in answer:
                        yield answer
                        return
                    total = answer["total"] * len(shadows)
                    yield {**answer, "done": base + answer["done"], "total": total}
                else:
                    yield {"error": "the volume's server ended the scrub without a report"}
                    return
        except OSError as err:
            yield {"error": f"the volume's server does not answer on {state_dir}: {err}"}
            return
        base += reports[-1][1]["bytes_scanned"]
    yield {"report": merge(reports)}


def merge(reports: list[tuple[str | None, dict[str, Any]]]) -> dict[str, Any]:
    """One report of the passes (shadow address, report), each discrepancy once: its last
    finding; a shadow's discrepancies say which shadow."""
    found: dict[tuple[str, int, str | None], dict[str, Any]] = {}
    for shadow, report in reports:
        for d in report["discrepancies"]:
            where = shadow if d["side"] == "shadow" else None
            found[(d["side"], d["block"], where)] = {**d, "shadow": where}
    discrepancies = sorted(found.values(), key=lambda d: (d["block"], d["side"]))
    repaired = sum(d["repaired"] for d in discrepancies)
    unrepaired = len(discrepancies) - repaired
    last = reports[-1][1]
    return {
        **last,
        "bytes_scanned": sum(r["bytes_scanned"] for _, r in reports),
        "seconds": round(sum(r["seconds"] for _, r in reports), 3),
        "rebuilt_maps": [m for _, r in reports for m in r["rebuilt_maps"]],
        "discrepancies": discrepancies,
        "repaired": repaired,
        "unrepaired": unrepaired,
        "shadows": [s for s, _ in reports if s is not None],
        "exit_code": 0 if not discrepancies else 1 if not unrepaired else 2,
    }
