"""What every act of the demo does: show a step, run a command as a shell transcript, wait for
something to happen, start a lab and stop it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from shadowblk.ports import free_port

SHADOWBLK = [sys.executable, "-m", "shadowblk.cli"]


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def shown(argv: list[str]) -> str:
    """ARGV as an operator would type it."""
    return " ".join(shlex.quote(a) for a in argv).replace(" ".join(SHADOWBLK), "shadowblk")


def run(
    argv: list[str], env: dict[str, str] | None = None, check: bool = True, quiet: bool = False
) -> str:
    """Run ARGV, echo it like a shell transcript, print its output (not if QUIET), return
    stdout."""
    if not quiet or "switchover" in argv:
        print(f"$ {shown(argv)}", flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    if out.strip() and not quiet:
        print("  " + out.strip().replace("\n", "\n  "), flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: step failed with exit code {proc.returncode}")
    return proc.stdout


def wait_for(probe: Any, timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(every)
    raise SystemExit(f"demo: {what} did not happen within {timeout:.0f} s")


def start_lab(lab_dir: Path, *options: str) -> subprocess.Popen:
    """`shadowblk lab up --dir LAB_DIR OPTIONS...`, echoed; returns once the lab is ready."""
    argv = [*SHADOWBLK, "lab", "up", "--dir", str(lab_dir), *options]
    print(f"$ {shown(argv)}", flush=True)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        print("  " + line.rstrip(), flush=True)
        if line.startswith("logs in"):
            return proc
    raise SystemExit(f"demo: the lab did not start (exit {proc.wait()})")


def stop_lab(lab_dir: Path, lab: subprocess.Popen) -> None:
    step("Stopping the lab")
    run([*SHADOWBLK, "lab", "down", "--dir", str(lab_dir)], check=False)
    if lab.poll() is None:
        lab.send_signal(signal.SIGTERM)
        lab.wait(30)


def lab_env(lab_dir: Path) -> dict[str, str]:
    """The environment the CLI needs to talk to the lab's manager."""
    doc = json.loads((lab_dir / "lab.json").read_text())
    return {
        **os.environ,
        "SHADOWBLK_MANAGER": doc["manager"]["url"],
        "SHADOWBLK_TOKEN": (lab_dir / "token").read_text().strip(),
    }


def hosted_endpoint(env: dict[str, str], server: str, volume: str) -> str | None:
    """The nbd:// endpoint SERVER reports for VOLUME once it serves it."""
    out = subprocess.run(
        [*SHADOWBLK, "server", "show", server, "--json"], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        return None
    report = json.loads(out.stdout).get("health", {}).get("hosted", {}).get(volume, {})
    return report.get("endpoint") if report.get("state") == "running" else None


def in_step(env: dict[str, str], volume: str) -> bool:
    """Whether every shadow of VOLUME is in step with its primary."""
    shown_volume = run([*SHADOWBLK, "volume", "show", volume, "--json"], env=env, quiet=True)
    return all(s["state"] == "in_sync" for s in json.loads(shown_volume)["shadows"])


def start_attach(env: dict[str, str], volume: str, log: Path) -> tuple[subprocess.Popen, str, str]:
    """`shadowblk attach VOLUME` following the lab's manager, its stderr in LOG: the process,
    the VM's nbd:// URI and attach's control URL."""
    port = free_port()
    with open(log, "ab") as errors:
        proc = subprocess.Popen(
            [*SHADOWBLK, "attach", volume, "--manager", env["SHADOWBLK_MANAGER"],
             "--listen", "127.0.0.1:0", "--control", f"127.0.0.1:{port}"],
            env=env, stdout=subprocess.PIPE, stderr=errors, text=True,
        )  # fmt: skip
    assert proc.stdout is not None
    uri = proc.stdout.readline().split()[1]
    print(f"  attach serves {uri}", flush=True)
    return proc, uri, f"http://127.0.0.1:{port}"


def start_fio(uri: str, cwd: Path, size_mib: int, iops: int) -> subprocess.Popen:
    """The VM's workload: random 4 KiB writes, each flushed, then every block read back and
    checked (crc32c); fio runs in CWD (it writes its verify state there)."""
    return subprocess.Popen(
        ["fio", "--name=vm", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         f"--size={size_mib}M", "--iodepth=4", "--fsync=1", f"--rate_iops={iops}",
         "--verify=crc32c", "--verify_fatal=1", "--randseed=11", "--output-format=terse"],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def fio_verified(fio: subprocess.Popen, control: str, size_mib: int, log: Path) -> None:
    """Wait for FIO; say what it and attach (at CONTROL, its stderr in LOG) saw; stop the demo
    if fio failed, with the end of attach's log."""
    _, err = fio.communicate(timeout=300)
    if fio.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"demo: fio failed: {err}\nthe end of {log}:\n{tail}")
    with urllib.request.urlopen(f"{control}/status", timeout=10) as reply:
        status = json.load(reply)
    print(
        f"  fio wrote {size_mib} MiB (flushing each write) and verified every block: exit 0; "
        f"attach answered {status['requests']} requests, {status['errors']} errors, "
        f"{status['retries']} retried, {status['replayed']} replayed",
        flush=True,
    )


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if PROC has not ended 30 s later."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
