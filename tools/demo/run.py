"""`make demo`: the main job on one machine, told step by step.

A lab fleet (a manager and three agents on loopback, SQLite, file-backed volumes), a volume
with a shadow, a workload through the primary's NBD endpoint, the tracker's view of it, the
shadow converging byte for byte, an integrity scrub of the pair, the fleet's status and
metrics; then the VM's view: fio writing and verifying through `attach` while the volume is
switched over, planned and then in an emergency (kill -9 of the primary's agent and its
children), with the pause of each and fio's verification. Then the predictive act
(tools/demo/predictive.py): a second lab whose server s1 replays a real failing drive's recorded
SMART days; the manager's model scores it, and its volume moves before the recorded failure day
while fio verifies through attach. Every step runs the real command an operator would type; the
demo stops its labs whatever happens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tools.demo import predictive
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

MiB = 1 << 20
VOLUME = "demo"
SIZE = 256 * MiB


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def demo(work: Path, model: Path) -> None:
    run([*SHADOWBLK, "doctor"])
    lab_dir = work / "lab"
    lab_dir.mkdir()
    step("1. A lab fleet: one manager and three agents (zones z1, z2, z3) on loopback")
    lab = start_lab(lab_dir, "--servers", "3", "--heartbeat-timeout", "2")
    try:
        tour(lab_dir)
    finally:
        stop_lab(lab_dir, lab)
    predictive.act(work, model)


def tour(lab_dir: Path) -> None:
    env = lab_env(lab_dir)
    run([*SHADOWBLK, "server", "list"], env=env)

    step("2. A volume with one shadow, placed by the manager in another zone")
    created = json.loads(
        run(
            [*SHADOWBLK, "volume", "create", VOLUME, "--size", "256M", "--shadows", "1",
             "--mode", "sync", "--primary", "s1", "--json"],
            env=env,
        )
    )  # fmt: skip
    shadow_server = created["volume"]["shadows"][0]["server"]
    run([*SHADOWBLK, "placement", "explain", VOLUME], env=env)

    step("3. A workload through the primary's NBD endpoint (qemu-io, a real NBD client)")
    url = wait_for(lambda: hosted_endpoint(env, "s1", VOLUME), 60, "the primary's endpoint")
    started = time.monotonic()
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 32M", "-c", "write -P 0xcd 96M 16M",
         "-c", "write -z 200M 8M", "-c", "flush", url])  # fmt: skip
    run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 0 32M", "-c", "read -P 0xcd 96M 16M", url])
    print(f"  wrote and verified 56 MiB in {time.monotonic() - started:.1f} s", flush=True)
    run(["nbdinfo", "--map", url])

    primary_dir = lab_dir / "servers" / "s1" / "primaries"
    step("4. What the tracker recorded (survives kill -9: over-reports, never forgets)")
    run([*SHADOWBLK, "dirty", "--state-dir", str(primary_dir / f"{VOLUME}.state")])

    step(f"5. The shadow on {shadow_server} converges to the primary, byte for byte")
    primary_img = primary_dir / f"{VOLUME}.img"
    shadow_img = lab_dir / "servers" / shadow_server / "shadows" / f"{VOLUME}.img"
    started = time.monotonic()

    def same() -> bool:
        return shadow_img.exists() and sha256(shadow_img) == sha256(primary_img)

    wait_for(same, 120, "the shadow's convergence")
    print(
        f"  sha256 of primary and shadow images equal ({sha256(primary_img)[:16]}…), "
        f"{time.monotonic() - started:.1f} s after the workload",
        flush=True,
    )
    run([*SHADOWBLK, "status", "--state-dir", str(primary_dir / f"{VOLUME}.state")], env=env)

    step("6. An integrity scrub of the pair: every block re-read and checked")
    maps = lab_dir / "maps"
    maps.mkdir()
    run([*SHADOWBLK, "scrub", "--image", str(primary_img), "--map", str(maps / "primary.map"),
         "--peer-image", str(shadow_img), "--peer-map", str(maps / "shadow.map")])  # fmt: skip

    step("7. The fleet as the manager sees it: status, metrics, dashboard")
    run([*SHADOWBLK, "status"], env=env)
    with urllib.request.urlopen(f"{env['SHADOWBLK_MANAGER']}/metrics", timeout=10) as r:
        families = sorted(
            {
                line.split()[2]
                for line in r.read().decode().splitlines()
                if line.startswith("# TYPE")
            }
        )
    print(f"  /metrics carries {len(families)} families, e.g. {', '.join(families[:4])}")
    print(f"  dashboard: {env['SHADOWBLK_MANAGER']}/dashboard/")
    switchovers(lab_dir, env)


def switchovers(lab_dir: Path, env: dict[str, str]) -> None:
    step("8. The VM's endpoint: `attach` follows the manager; fio writes and verifies through it")
    attach, uri, control = start_attach(env, VOLUME, lab_dir / "logs" / "attach.log")
    try:
        fio = start_fio(uri, lab_dir, 24, 250)
        moves(lab_dir, env, control)
        fio_verified(fio, control, 24, lab_dir / "logs" / "attach.log")
    finally:
        stop(attach)
    run([*SHADOWBLK, "status"], env=env)


def moves(lab_dir: Path, env: dict[str, str], control: str) -> None:
    """A planned switchover, then kill -9 of the new primary's agent, under fio."""
    wait_for(lambda: in_step(env, VOLUME), 60, "the shadow in step")
    step("9. A planned switchover (an operator, or the predictor): fence, last epoch, promote")
    record = json.loads(run([*SHADOWBLK, "switchover", VOLUME, "--reason", "demo", "--json"],
                            env=env, quiet=True))  # fmt: skip
    print(
        f"  {record['from']} -> {record['to']}: pause {record['pause_seconds'] * 1000:.0f} ms "
        f"(steps {record['timings_ms']}), old primary kept for {record['old_primary']}"
    )
    wait_for(lambda: in_step(env, VOLUME), 60, "the old primary in step as a shadow")
    step(f"10. An emergency: kill -9 of {record['to']}'s agent and its children")
    doc = json.loads((lab_dir / "lab.json").read_text())
    (agent,) = [a["pid"] for a in doc["agents"] if a["name"] == record["to"]]
    for pid in [agent, *children(agent)]:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    last = wait_for(lambda: emergency(env), 60, "the emergency switchover")
    print(
        f"  {last['from']} -> {last['to']} after {time.monotonic() - killed:.1f} s: "
        f"{last['pause_seconds']:.1f} s from the last heartbeat to the repoint; "
        f"attach held the VM's I/O meanwhile",
        flush=True,
    )
    print(f"  attach: {json.loads(urllib.request.urlopen(control + '/status').read())['upstream']}")


def emergency(env: dict[str, str]) -> dict | None:
    with urllib.request.urlopen(f"{env['SHADOWBLK_MANAGER']}/v1/switchovers", timeout=10) as r:
        records = json.load(r)["switchovers"]
    return records[-1] if records and not records[-1]["planned"] else None


def children(pid: int) -> list[int]:
    """PIDs whose parent is PID."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.demo.run", description=__doc__)
    parser.add_argument(
        "--model",
        type=Path,
        default=predictive.MODEL,
        help="The manager's SMART model for the predictive act (make smart-model) [%(default)s].",
    )
    model = parser.parse_args().model
    if not model.is_file():
        raise SystemExit(f"demo: no SMART model at {model}: `make smart-model` trains it")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="shadowblk-demo-"))
    try:
        demo(work, model.resolve())
    except BaseException:
        print(f"\ndemo failed: its labs' logs are kept in {work}", file=sys.stderr, flush=True)
        raise
    shutil.rmtree(work)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
