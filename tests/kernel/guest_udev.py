"""Guest side of the udev test, run in the host's userland inside the guest (klab-chroot), with
the host's systemd-udevd running there on udev/90-shadowblk.rules (tests/kernel/guest/udev.sh).

The agent's device pieces run here as in `shadowblk agent`: its control endpoint (with the
local token in /run/shadowblk/agent.json, for the rule's `shadowblk notify-device`), the pyudev
watcher and DeviceWatch, whose emergency call goes to a real manager on the host (at MANAGER,
with TOKEN) where vol1's primary is s1, this "agent".

A tagged (sbk-vol1) and an untagged (plain1) dm-linear device appear; `udevadm test` shows the
rule's properties on the first only; the watcher reports the first one's add/change; when it is
removed, the watcher and the rule's RUN (notify-device, on the control endpoint) both report it
and DeviceWatch asks the manager, once, for vol1's emergency switchover (vol1, a local primary
here). The same for two GPT partitions named sbk-vol2 and plain2 (present from boot: `udevadm
test` and a `change` event triggered on each).
Usage: python -m tests.kernel.guest_udev OUT MANAGER TOKEN DISK PART_TAGGED PART_PLAIN
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from shadowblk.agent import notify
from shadowblk.agent.control import serve_control
from shadowblk.agent.devices import DeviceWatch
from shadowblk.agent.hosting import Endpoint, Hosting, Replication
from shadowblk.agent.udev_watch import DeviceEvent, UdevWatcher
from shadowblk.manager.client import Client

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


def main(out: Path, manager: str, token: str, disk: str, tagged: str, plain: str) -> None:
    events: list[DeviceEvent] = []
    notified: list[DeviceEvent] = []  # what reached the control endpoint (the rule's RUN)
    devices = DeviceWatch(Client(manager, token, timeout_s=60), "s1", lambda: {"vol1"})

    started: list[str] = []  # which source's report started an emergency

    def watched(event: DeviceEvent) -> None:
        events.append(event)
        if devices.event(event):
            started.append("watcher")

    def posted(event: DeviceEvent) -> bool:
        notified.append(event)
        if devices.event(event):
            started.append("notify")
            return True
        return False

    data = Path("/run/sbk-agent")  # a tmpfs (udev.sh): the host's userland is read-only here
    hosting = Hosting(data, Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", 0),
                      Replication(False, data / "hmac.key", str))  # fmt: skip
    control = serve_control(Endpoint("127.0.0.1", 0), hosting, token, posted, "local-token")
    notify.publish(notify.RUN_DIR, f"127.0.0.1:{control.server_port}", "local-token")
    watcher = UdevWatcher(watched)
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
        # udev runs notify-device (a Python start: 5-30 s here) before it settles the event
        result["notified_remove"] = wait_for(notified, ("remove", "sbk-vol1"), timeout=150)
        time.sleep(2)  # any event of plain1 would have arrived by now
        deadline = time.monotonic() + 60
        while not (devices.records or devices.refused) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        watcher.stop()
        devices.stop()
        control.shutdown()
    result["events"] = [[e.action, e.name, e.volume] for e in events]
    result["notified"] = [[e.action, e.name, e.devnode] for e in notified]
    result["lost"] = sorted(devices.lost)
    result["started"] = started
    result["manager_answers"] = devices.records
    result["manager_refusals"] = devices.refused
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:7])
