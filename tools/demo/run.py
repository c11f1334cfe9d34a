"""`make demo`: the main job on one machine, told step by step.

A lab fleet (a manager and three agents on loopback, SQLite, file-backed volumes), a volume
with a shadow, a workload through the primary's NBD endpoint, the tracker's view of it, the
shadow converging byte for byte, an integrity scrub of the pair, the fleet's status and
metrics; then the VM's view: fio writing and verifying through `attach` while the volume is
switched over, planned and then in an emergency (kill -9 of the primary's agent and its
children), with the pause of each and fio's verification. Every step runs the real command an
operator would type; the demo stops the lab whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from shadowblk.ports import free_port

SHADOWBLK = [sys.executable, "-m", "shadowblk.cli"]
MiB = 1 << 20
VOLUME = "demo"
SIZE = 256 * MiB


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(
    argv: list[str], env: dict[str, str] | None = None, check: bool = True, quiet: bool = False
) -> str:
    """Run ARGV, echo it like a shell transcript, print its output (not if QUIET), return
    stdout."""
    shown = " ".join(shlex.quote(a) for a in argv).replace(" ".join(SHADOWBLK), "shadowblk")
    if not quiet or "switchover" in argv:
        print(f"$ {shown}", flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    if out.strip() and not quiet:
        print("  " + out.strip().replace("\n", "\n  "), flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: step failed with exit code {proc.returncode}")
    return proc.stdout


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def wait_for(probe: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(0.25)
    raise SystemExit(f"demo: {what} did not happen within {timeout:.0f} s")


def start_lab(lab_dir: Path) -> subprocess.Popen:
    step("1. A lab fleet: one manager and three agents (zones z1, z2, z3) on loopback")
    print(f"$ shadowblk lab up --servers 3 --dir {lab_dir} --heartbeat-timeout 2", flush=True)
    argv = [*SHADOWBLK, "lab", "up", "--servers", "3", "--dir", str(lab_dir)]
    proc = subprocess.Popen(
        [*argv, "--heartbeat-timeout", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        print("  " + line.rstrip(), flush=True)
        if line.startswith("logs in"):
            return proc
    raise SystemExit(f"demo: the lab did not start (exit {proc.wait()})")


def hosted_endpoint(env: dict[str, str], server: str) -> str | None:
    out = subprocess.run(
        [*SHADOWBLK, "server", "show", server, "--json"], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        return None
    report = json.loads(out.stdout).get("health", {}).get("hosted", {}).get(VOLUME, {})
    return report.get("endpoint") if report.get("state") == "running" else None


def demo(work: Path) -> None:
    run([*SHADOWBLK, "doctor"])
    lab_dir = work / "lab"
    lab_dir.mkdir()
    lab = start_lab(lab_dir)
    try:
        tour(lab_dir)
    finally:
        step("Stopping the lab")
        run([*SHADOWBLK, "lab", "down", "--dir", str(lab_dir)], check=False)
        if lab.poll() is None:
            lab.send_signal(signal.SIGTERM)
            lab.wait(30)


def tour(lab_dir: Path) -> None:
    doc = json.loads((lab_dir / "lab.json").read_text())
    env = {
        **os.environ,
        "SHADOWBLK_MANAGER": doc["manager"]["url"],
        "SHADOWBLK_TOKEN": (lab_dir / "token").read_text().strip(),
    }
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
    url = wait_for(lambda: hosted_endpoint(env, "s1"), 60, "the primary's endpoint")
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
    port = free_port()
    attach = subprocess.Popen(
        [*SHADOWBLK, "attach", VOLUME, "--manager", env["SHADOWBLK_MANAGER"],
         "--listen", "127.0.0.1:0", "--control", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert attach.stdout is not None
        uri = attach.stdout.readline().split()[1]
        print(f"  attach serves {uri}", flush=True)
        fio = subprocess.Popen(
            ["fio", "--name=vm", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
             "--size=24M", "--iodepth=4", "--fsync=1", "--rate_iops=250", "--verify=crc32c",
             "--verify_fatal=1", "--randseed=11", "--output-format=terse"],
            cwd=lab_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        moves(lab_dir, env, f"http://127.0.0.1:{port}")
        _, err = fio.communicate(timeout=300)
        if fio.returncode:
            raise SystemExit(f"demo: fio failed: {err}")
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/status").read())
        print(
            f"  fio wrote 24 MiB (flushing each write) and verified every block: exit 0; "
            f"attach answered {status['requests']} requests, {status['errors']} errors, "
            f"{status['retries']} retried, {status['replayed']} replayed",
            flush=True,
        )
    finally:
        attach.send_signal(signal.SIGTERM)
        attach.wait(30)
    run([*SHADOWBLK, "status"], env=env)


def moves(lab_dir: Path, env: dict[str, str], control: str) -> None:
    """A planned switchover, then kill -9 of the new primary's agent, under fio."""

    def in_step() -> bool:
        volume = json.loads(run([*SHADOWBLK, "volume", "show", VOLUME, "--json"], env=env,
                                quiet=True))  # fmt: skip
        return all(s["state"] == "in_sync" for s in volume["shadows"])

    wait_for(in_step, 60, "the shadow in step")
    step("9. A planned switchover (an operator, or the predictor): fence, last epoch, promote")
    record = json.loads(run([*SHADOWBLK, "switchover", VOLUME, "--reason", "demo", "--json"],
                            env=env, quiet=True))  # fmt: skip
    print(
        f"  {record['from']} -> {record['to']}: pause {record['pause_seconds'] * 1000:.0f} ms "
        f"(steps {record['timings_ms']}), old primary kept for {record['old_primary']}"
    )
    wait_for(in_step, 60, "the old primary in step as a shadow")
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
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shadowblk-demo-") as tmp:
        demo(Path(tmp))
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
