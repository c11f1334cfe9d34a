"""Guest side of the switchover test, run in the host's userland inside the guest (klab-chroot).

The same writer (QD1, O_DIRECT, 4 KiB blocks, each headed "pass P block B", every write's start
and end time taken here in the guest) runs twice: on /dev/mapper/vm-vol made by `shadowblk attach
--dm --manager` (a table swap from the primary's /dev/nbdX to the shadow's, which the attach
makes by itself when the manager's map moves: s1's heartbeat, sent from here to the manager on
the host at MANAGER with TOKEN, names the shadow's export as vol's primary endpoint), then on a
/dev/nbdN (the kernel client, connected here) over the userspace router (`shadowblk attach
--listen`, repointed by POST /repoint). switch.sh started both attach processes (fixed ports:
the guest is ours alone). Both swaps go from the primary to the shadow while the writer runs;
afterwards every block must hold its last write.
Usage: python -m tests.kernel.guest_switch OUT SHADOW_URI MANAGER TOKEN
"""

import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path

from shadowblk.kernel.nbd import KernelNBD
from shadowblk.manager.client import Client
from tests.kernel.guest_writer import Writer, post, wait_ready

CONTROL = {"dm": "127.0.0.1:7001", "router": "127.0.0.1:7002"}  # as switch.sh starts them
ROUTER_PORT = 7010


def run_writer(device: str, control: str, repoint: Callable[[], dict]) -> dict:
    """The writer on DEVICE for 3 s, REPOINT() (to the shadow), 2 s more, a pause and a resume
    (a switchover that did not happen), 1 s more; what it saw."""
    writer = Writer(device)
    writer.start()
    time.sleep(3)
    t0 = time.monotonic()
    answer = repoint()
    t1 = time.monotonic()
    time.sleep(2)
    paused = post(f"http://{control}/pause", {"limit_s": 30})
    time.sleep(0.3)
    resumed = post(f"http://{control}/resume", {})
    time.sleep(1)
    writer.stop.set()
    writer.join()
    return {**summary(writer, t0, t1), "repoint": answer, "pause": paused, "resume": resumed}


def follow(control: str, shadow: str, client: Client) -> Callable[[], dict]:
    """A repoint by the manager: vol's primary endpoint becomes SHADOW in its map; the swap the
    attach at CONTROL then makes by itself (its last repoint, once its /status has one)."""

    def repoint() -> dict:
        client.heartbeat("s1", used_bytes=0, hosted={"vol": {
            "role": "primary", "state": "running", "endpoint": shadow,
            "generation": 1}})  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://{control}/status", timeout=30) as reply:
                status = json.loads(reply.read())
            if status["repoints"]:
                return {**status["last_repoint"], "status": status}
            time.sleep(0.05)
        raise RuntimeError(f"the attach at {control} did not follow the manager to {shadow}")

    return repoint


def summary(writer: Writer, t0: float, t1: float) -> dict:
    """What the writer saw before, around (T0 to T1) and after a swap."""
    return {
        "writes": len(writer.times),
        "writes_before_swap": sum(e < t0 for _, e in writer.times),
        "writes_after_swap": sum(s > t1 for s, _ in writer.times),
        "errors": writer.errors,
        "bad_blocks": writer.verify(),
        "repoint_call_ms": round((t1 - t0) * 1000, 1),
        "max_write_ms_around_swap": writer.max_ms_around(t0, t1),
        "median_write_ms": writer.median_ms(),
        "max_write_ms_elsewhere": round(
            max(((e - s) * 1000 for s, e in writer.times if e < t0 or s > t1), default=0.0), 1
        ),
    }


def at_return(nbd: KernelNBD) -> dict:
    """What sysfs says of NBD's device the moment KernelNBD returned it. One handed out before
    the kernel started it had no capacity yet: a write that reached it failed with EIO
    (docs/attach.md, "Write errors in a dm swap")."""
    sysfs = Path("/sys/block") / nbd.device.name
    sectors = int((sysfs / "size").read_text())
    return {"bytes": sectors * 512, "pid": (sysfs / "pid").exists(), "export_bytes": nbd.size}


def main(out: Path, shadow: str, manager: str, token: str) -> None:
    result = {}
    pid, result["dm_ready"] = wait_ready(out / "dm.out", CONTROL["dm"])
    client = Client(manager, token)
    result["dm"] = run_writer("/dev/mapper/vm-vol", CONTROL["dm"],
                              follow(CONTROL["dm"], shadow, client))  # fmt: skip
    os.kill(pid, signal.SIGTERM)  # switch.sh waits for its clean exit
    pid, result["router_ready"] = wait_ready(out / "router.out", CONTROL["router"])
    nbd = KernelNBD("127.0.0.1", ROUTER_PORT, "vol")
    result["router_nbd_at_return"] = at_return(nbd)
    try:
        repoint = partial(post, f"http://{CONTROL['router']}/repoint",
                          {"uri": shadow, "generation": 1})  # fmt: skip
        result["router"] = run_writer(str(nbd.device), CONTROL["router"], repoint)
    finally:
        nbd.close()
    os.kill(pid, signal.SIGTERM)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:5])
