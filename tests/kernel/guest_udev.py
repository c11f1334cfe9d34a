"""Guest side of the udev test, run in the host's userland inside the guest (klab-chroot), with
the host's systemd-udevd running there on udev/90-shadowblk.rules (tests/kernel/guest/udev.sh).

A tagged (sbk-vol1) and an untagged (plain1) dm-linear device appear; `udevadm test` shows the
rule's properties on the first only; the watcher reports the first one's add/change and,
when it is removed, calls the emergency switchover hook for its volume, a local primary here.
The same for two GPT partitions named sbk-vol2 and plain2 (present from boot: `udevadm test`
and a `change` event triggered on each).
Usage: python -m tests.kernel.guest_udev OUT DISK PART_TAGGED PART_PLAIN
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from shadowblk.agent.udev_watch import DeviceEvent, UdevWatcher

ENV = {**os.environ, "DM_DISABLE_UDEV": "1", "SYSTEMD_IGNORE_CHROOT": "1"}


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=ENV).stdout


def wait_for(events: list, what: tuple[str, str], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what in [(e.action, e.name) for e in events]:
            return True
        time.sleep(0.1)
    return False


def rule_lines(sys_path: str) -> list[str]:
    """What `udevadm test` says our rule set: SHADOWBLK_* and the tags."""
    lines = run("udevadm", "test", "--action=add", sys_path).splitlines()
    return [x for x in lines if x.startswith(("SHADOWBLK", "TAGS="))]


def main(out: Path, disk: str, tagged: str, plain: str) -> None:
    events: list[DeviceEvent] = []
    lost: list[str] = []
    watcher = UdevWatcher(events.append, lambda: {"vol1"}, lost.append)
    watcher.start()
    sectors = int(run("blockdev", "--getsz", disk)) // 2
    result: dict = {}
    try:
        for name, start in (("sbk-vol1", 0), ("plain1", sectors)):
            run("dmsetup", "create", name, "--table", f"0 {sectors} linear {disk} {start}")
        result["saw_add"] = wait_for(events, ("add", "sbk-vol1"))
        result["saw_change"] = wait_for(events, ("change", "sbk-vol1"))
        run("udevadm", "settle", "-t", "60")
        for name in ("sbk-vol1", "plain1"):
            dm = Path(os.path.realpath(f"/dev/mapper/{name}")).name
            if not dm.startswith("dm-"):  # a node made by hand: find dm-N by name in sysfs
                dm = next(p.parent.parent.name for p in Path("/sys/block").glob("dm-*/dm/name")
                          if p.read_text().strip() == name)  # fmt: skip
            result[f"test_{name}"] = rule_lines(f"/sys/class/block/{dm}")
        for name, part in (("sbk-vol2", tagged), ("plain2", plain)):
            result[f"test_{name}"] = rule_lines(f"/sys/class/block/{Path(part).name}")
            run("udevadm", "trigger", "--action=change", "--settle", part)
        result["saw_partition_change"] = wait_for(events, ("change", "sbk-vol2"))
        run("dmsetup", "remove", "sbk-vol1")
        result["saw_remove"] = wait_for(events, ("remove", "sbk-vol1"))
        run("dmsetup", "remove", "plain1")
        time.sleep(2)  # any event of plain1 would have arrived by now
    finally:
        watcher.stop()
    result["events"] = [[e.action, e.name, e.volume] for e in events]
    result["lost"] = lost
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:5])
