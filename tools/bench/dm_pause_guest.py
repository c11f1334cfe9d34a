"""Guest side of the dm_pause benchmark, run in the host's userland inside the guest.

Two attaches over the same two exports (A and B, one file on the host) run side by side:
`attach --dm` (/dev/mapper/vm-vol) and the userspace router (`attach --listen`, a kernel
/dev/nbdN connected to it here). Each round: the writer (tests/kernel/guest_writer.py) runs on
the dm device, the dm attach is repointed to the other export, the writer stops and verifies;
then the same on the router's device. Rounds alternate A->B, B->A, and which path goes first.
Usage: python -m tools.bench.dm_pause_guest OUT A_URI B_URI ROUNDS SETTLE_S
"""

import json
import sys
import time
from pathlib import Path

from shadowblk.kernel.nbd import KernelNBD
from tests.kernel.guest_writer import Writer, post, wait_ready

CONTROL = {"dm": "127.0.0.1:7001", "router": "127.0.0.1:7002"}  # as dm_pause.py starts them
ROUTER_PORT = 7010


def one_swap(path: str, device: str, uri: str, settle: float) -> dict:
    """The writer on DEVICE for SETTLE s, PATH's attach repointed to URI, SETTLE s more."""
    writer = Writer(device)
    writer.start()
    time.sleep(settle)
    t0 = time.monotonic()
    answer = post(f"http://{CONTROL[path]}/repoint", {"uri": uri, "generation": 1})
    t1 = time.monotonic()
    time.sleep(settle)
    writer.stop.set()
    writer.join()
    row = {
        "path": path,
        "to": uri,
        "writer_max_ms": writer.max_ms_around(t0, t1),
        "writer_median_ms": writer.median_ms(),
        "writes": len(writer.times),
        "errors": writer.errors,
        "bad_blocks": writer.verify(),
        "call_ms": round((t1 - t0) * 1000, 1),
        "t0": round(t0, 3),  # to place the writer's errors, if any, in the call
    }
    keys = ("pause_ms", "suspend_ms", "resume_ms", "load_ms", "connect_ms", "gate_closed_ms",
            "drain_ms")  # fmt: skip
    row |= {k: answer[k] for k in ("device",) if k in answer}  # the /dev/nbdY now under it
    return row | {k: round(answer[k], 2) for k in keys if k in answer}


def main(out: Path, uris: tuple[str, str], rounds: int, settle: float) -> None:
    wait_ready(out / "dm.out", CONTROL["dm"])
    wait_ready(out / "router.out", CONTROL["router"])
    nbd = KernelNBD("127.0.0.1", ROUTER_PORT, "vol")
    devices = {"dm": "/dev/mapper/vm-vol", "router": str(nbd.device)}
    rows = []
    try:
        for i in range(rounds):
            uri = uris[(i + 1) % 2]  # both start on A
            order = ("dm", "router") if i % 2 == 0 else ("router", "dm")
            for path in order:
                rows.append({"round": i, **one_swap(path, devices[path], uri, settle)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        nbd.close()
        (out / "swaps.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), (sys.argv[2], sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
