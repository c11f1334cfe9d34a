"""The demo's predictive act: a real failing drive's recorded SMART days replayed on one server of
a lab; the manager's model scores it at every heartbeat, and once the failure probability has
stayed over the threshold for the sustain time the server's volume is switched over, before the
drive's recorded failure day, while fio writes and verifies through `attach`.

The drive: Seagate ST31500341AS serial 9VS1QC90 of the Backblaze extract in shared/data, failed
on 2014-05-24. `make smart-model` (seed 0) keeps it among the 25% of drives held out of training,
and scores it under 0.02 until 2014-05-04 and over 0.55 from 2014-05-05 (its reallocated sectors
jump from 70 to 4092) to 2014-05-11. The lab has its own manager and replay clock, so the act's
timing does not depend on how long the rest of the demo took.
"""

from __future__ import annotations

import gzip
import json
import time
from datetime import date
from pathlib import Path
from typing import Any

from shadowblk.manager.client import Client
from tools.demo.shell import (
    SHADOWBLK,
    fio_verified,
    hosted_endpoint,
    in_step,
    lab_env,
    run,
    start_attach,
    start_fio,
    start_lab,
    step,
    stop,
    stop_lab,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "build" / "smart-model.json"  # make smart-model
DATA = REPO.parent / "shared" / "data" / "hds.csv.gz"
SERIAL, FAILED = "9VS1QC90", "2014-05-24"
WARNING = "2014-05-05"  # the first recorded day MODEL scores the drive over the threshold
START = "2014-04-19"  # the replay's first day: 32 s to set the volume up before the warning
SPEED = 0.5  # recorded days per second
THRESHOLD, SUSTAIN_S = 0.5, 5
VOLUME, IOPS = "vm", 200


def days(a: str, b: str) -> int:
    """Days from date A to date B."""
    return (date.fromisoformat(b) - date.fromisoformat(a)).days


def act(work: Path, model: Path) -> None:
    started = time.monotonic()
    step("11. The predictive act: a second lab whose server s1 replays a real failing drive")
    print(
        f"  drive {SERIAL} (Seagate ST31500341AS, Backblaze Drive Stats) failed on {FAILED};\n"
        f"  its recorded SMART days from {START}, one every {1 / SPEED:g} s, are s1's disk. The\n"
        f"  manager scores them with {model} (trained without this drive)\n"
        f"  and moves s1's primaries once P(failure within 30 days) has stayed >= {THRESHOLD}\n"
        f"  for {SUSTAIN_S} s.",
        flush=True,
    )
    lab_dir = work / "predictive"
    lab_dir.mkdir()
    rows = drive_rows(work)
    lab = start_lab(
        lab_dir, "--servers", "2", "--heartbeat-timeout", "2", "--model", str(model),
        "--preempt-threshold", str(THRESHOLD), "--preempt-sustain", f"{SUSTAIN_S}s",
        "--smart-replay", f"s1={rows}", "--smart-serial", f"s1={SERIAL}",
        "--replay-start", f"s1={START}", "--replay-speed", str(SPEED),
    )  # fmt: skip
    try:
        moved_under_fio(lab_dir)
    finally:
        stop_lab(lab_dir, lab)
    print(f"  the predictive act took {time.monotonic() - started:.0f} s", flush=True)


def drive_rows(work: Path) -> Path:
    """The drive's start-stop rows of DATA as a CSV of its own in WORK: its agent reads them in
    a moment (the whole extract would take it seconds of pandas)."""
    out = work / f"{SERIAL}.csv"
    with gzip.open(DATA, "rt") as src, open(out, "w") as dst:
        dst.write(next(src))
        dst.writelines(line for line in src if line.startswith(f"{SERIAL},"))
    print(f"  {DATA.name}: the drive's rows -> {out}", flush=True)
    return out


def failure(client: Client) -> dict[str, Any]:
    """s1's failure document as the manager stored it with its last heartbeat."""
    return client.server("s1").get("health", {}).get("failure") or {}


def replay_date(doc: dict[str, Any]) -> str | None:
    """The recorded day s1's failure document DOC was judged on."""
    return (doc.get("signals") or {}).get("smart", {}).get("replay", {}).get("date")


def moved_under_fio(lab_dir: Path) -> None:
    env = lab_env(lab_dir)
    client = Client(env["SHADOWBLK_MANAGER"])
    step("12. A volume on s1 while its drive still looks healthy, its shadow on s2")
    run([*SHADOWBLK, "volume", "create", VOLUME, "--size", "64M", "--shadows", "1",
         "--mode", "sync", "--primary", "s1"], env=env)  # fmt: skip
    wait_for(lambda: hosted_endpoint(env, "s1", VOLUME), 60, f"{VOLUME} served on s1")
    wait_for(lambda: in_step(env, VOLUME), 60, f"{VOLUME}'s shadow in step")
    today = wait_for(lambda: replay_date(failure(client)), 30, "s1's first scored heartbeat")
    if today >= WARNING:
        raise SystemExit(
            f"demo: s1's replay reached {today} before {VOLUME} was ready (the drive warns on "
            f"{WARNING}): this machine is too busy for the act's timing"
        )
    attach, uri, control = start_attach(env, VOLUME, lab_dir / "logs" / "attach.log")
    fio = None
    try:
        # fio writes until some 8 s after the expected move, then reads every block back
        seconds = days(today, WARNING) / SPEED + SUSTAIN_S + 8
        size = min(60, max(8, round(seconds * IOPS * 4 / 1024)))
        fio = start_fio(uri, lab_dir, size, IOPS)
        step("13. The manager scores s1 at every heartbeat (recorded day: probability, trigger)")
        watch(client)
        if fio.poll() is not None:
            raise SystemExit("demo: fio ended before the volume moved: the act proves less")
        step("14. Why it moved, and the switchover it made")
        explain(client)
        fio_verified(fio, control, size, lab_dir / "logs" / "attach.log")
    finally:
        if fio is not None and fio.poll() is None:  # the demo stops early: its client first
            stop(fio)
        stop(attach)
    run([*SHADOWBLK, "server", "list"], env=env)


def watch(client: Client) -> None:
    """Print s1's verdict whenever the recorded day or the trigger's state changes, until the
    volume has left s1; stop the demo if the drive reaches its failure day first."""
    last: tuple[str, str] | None = None

    def moved() -> bool:
        nonlocal last
        doc = failure(client)
        day, trigger = replay_date(doc) or "?", doc.get("trigger", {}).get("state", "?")
        if (day, trigger) != last:
            last = (day, trigger)
            print(
                f"  {day}  P = {doc['probability']:.3f}  confidence "
                f"{doc.get('confidence', 0):.2f} ({doc.get('level', '?')})  trigger {trigger}",
                flush=True,
            )
        if client.volume(VOLUME)["primary"] != "s1":
            return True
        if day != "?" and day >= FAILED:
            raise SystemExit(f"demo: the drive reached its failure day with {VOLUME} still on s1")
        return False

    wait_for(moved, days(START, FAILED) / SPEED + 60, f"{VOLUME} moved off s1", every=0.5)


def explain(client: Client) -> None:
    """The failure-preempt decision (probability, confidence, reasons, the drive's top
    features) and the switchover record with its reason."""
    (event,) = [e for e in client.events(0, 1000)
                if e["kind"] == "failure-preempt" and e["subject"] == "s1"]  # fmt: skip
    detail = event["detail"]
    decided = detail["smart"]["replay"]["date"]
    print(
        f"  decision (event failure-preempt, recorded day {decided}): P = "
        f"{detail['probability']:.3f}, confidence {detail['confidence']:.2f}, "
        f"action {detail['action']} of {', '.join(detail['primaries'])} ({detail.get('drain')})",
        flush=True,
    )
    for reason in detail["reasons"]:
        print(f"    reason: {reason}")
    disk = detail["smart"]["disks"]["replay"]
    print(f"    top features of drive {disk['serial']} (log-odds contribution):")
    for driver in disk["drivers"][:5]:
        name, value, weight = driver["feature"], driver["value"], driver["contribution"]
        print(f"      {name:<34} = {value:<10g} {weight:+.2f}")
    (record,) = wait_for(
        lambda: client.call("GET", "/v1/switchovers", volume=VOLUME)["switchovers"] or None,
        30,
        "the switchover's record",
    )
    print(
        f"  switchover {record['from']} -> {record['to']}: {record['outcome']}, pause "
        f"{record['pause_seconds'] * 1000:.0f} ms, generation {record['generation']}\n"
        f"    reason: {record['reason']}",
        flush=True,
    )
    if record["outcome"] != "succeeded":
        raise SystemExit(f"demo: the switchover did not succeed: {json.dumps(record)}")
    print(
        f"  {VOLUME} left s1 on recorded day {decided}, {days(decided, FAILED)} days before the "
        f"drive's recorded failure on {FAILED}",
        flush=True,
    )
