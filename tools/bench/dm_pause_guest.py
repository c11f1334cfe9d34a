"""Guest side of the dm_pause benchmark, run in the host's userland inside the guest.

Attaches over the same two exports (A and B, one file on the host) run side by side: one
`attach --dm` per swap kind measured (`--dm-swap one`: /dev/mapper/vm-one, `two`:
/dev/mapper/vm-two) and the userspace router (`attach --listen`, a kernel /dev/nbdN connected
to it here). Each round: for each path in turn, the writer (tests/kernel/guest_writer.py) runs
on its device, its attach is repointed to the other export, the writer stops and verifies.
Rounds alternate A->B, B->A, and rotate which path goes first. At the end it stops the
attaches (SIGTERM to their Python processes: the guest script waits for their clean exit).

The VM-visible pause of every path, by issue 7's definition of a switchover's pause ("max
completion latency during a switchover minus the baseline max"): the slowest write in flight
at any moment of the repoint call (the switchover: POST /repoint sent -> answered, the same
call on every path; `writer_max_ms`) minus the slowest write of the SETTLE s of writes just
before it, on the same device in the same boot (started and ended before the call;
`writer_base_max_ms`), floored at 0 as tools/bench/switchover_pause.py does (`vm_pause_ms`).
Usage: python -m tools.bench.dm_pause_guest OUT A_URI B_URI ROUNDS SETTLE_S PATH[,PATH...]
(PATH: dm-one, dm-two, router)
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

from shadowblk.kernel.nbd import KernelNBD
from tests.kernel.guest_writer import Writer, post, wait_ready

# the control endpoints, as dm_pause.py starts the attaches
CONTROL = {"dm-one": "127.0.0.1:7001", "router": "127.0.0.1:7002", "dm-two": "127.0.0.1:7003"}
ROUTER_PORT = 7010
KEYS = ("pause_ms", "suspend_ms", "resume_ms", "load_ms", "connect_ms", "gate_closed_ms",
        "drain_ms")  # fmt: skip


def pause_window(answer: dict) -> tuple[float, float]:
    """When I/O was held, on this guest's monotonic clock: the dm swap's ioctls, or the
    router's gate closed -> opened."""
    if "started_at" in answer:
        return answer["started_at"], answer["started_at"] + answer["pause_ms"] / 1000
    return answer["closed_at"], answer["closed_at"] + answer["gate_closed_ms"] / 1000


def one_swap(path: str, device: str, uri: str, settle: float) -> dict:
    """The writer on DEVICE for SETTLE s, PATH's attach repointed to URI, SETTLE s more."""
    writer = Writer(device)
    writer.start()
    time.sleep(settle)
    t0 = time.monotonic()
    answer = post(f"http://{CONTROL[path]}/repoint", {"uri": uri, "generation": 1})
    t1 = time.monotonic()
    window = pause_window(answer)
    time.sleep(settle)
    writer.stop.set()
    writer.join()
    during, base = writer.max_ms_around(t0, t1), writer.max_ms_within(t0 - settle, t0)
    row = {
        "path": path,
        "to": uri,
        "vm_pause_ms": round(max(during - base, 0.0), 1),
        "writer_max_ms": during,
        "writer_base_max_ms": base,
        "writer_max_in_pause_ms": writer.max_ms_around(*window),
        "window": [round(t, 4) for t in window],  # to place the kernel's traced calls
        "writer_median_ms": writer.median_ms(),
        "writes": len(writer.times),
        "errors": writer.errors,
        "bad_blocks": writer.verify(),
        "call_ms": round((t1 - t0) * 1000, 1),
        "t0": round(t0, 3),  # to place the writer's errors, if any, in the call
    }
    row |= {k: answer[k] for k in ("device", "ioctls") if k in answer}
    return row | {k: round(answer[k], 2) for k in KEYS if answer.get(k) is not None}


def main(out: Path, uris: tuple[str, str], rounds: int, settle: float, paths: list[str]) -> None:
    pids = [wait_ready(out / f"{path}.out", CONTROL[path])[0] for path in paths]
    nbd = KernelNBD("127.0.0.1", ROUTER_PORT, "vol") if "router" in paths else None
    devices = {"dm-one": "/dev/mapper/vm-one", "dm-two": "/dev/mapper/vm-two",
               "router": str(nbd.device) if nbd else ""}  # fmt: skip
    rows = []
    try:
        for i in range(rounds):
            uri = uris[(i + 1) % 2]  # all start on A
            for path in paths[i % len(paths) :] + paths[: i % len(paths)]:
                rows.append({"round": i, **one_swap(path, devices[path], uri, settle)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if nbd is not None:
            nbd.close()
        (out / "swaps.json").write_text(json.dumps(rows, indent=1))
        for pid in pids:  # the guest script waits for their clean exit
            os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    main(Path(sys.argv[1]), (sys.argv[2], sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
         sys.argv[6].split(","))  # fmt: skip
