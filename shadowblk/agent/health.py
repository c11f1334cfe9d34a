"""The server's health as the agent reports it in heartbeats: space, a cheap latency probe,
I/O errors, and SMART data of the disk under the data directory when there is a real one.

The probe writes, fsyncs and reads back 4 KiB in the data directory once per heartbeat: it
costs one small synchronous write a second, yet it sees what a volume's writes see when the
disk starts to retry (the latency spike a failing drive shows before it fails).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from shadowblk.agent.metrics import AgentMetrics

PROBE_BYTES = 4096
SMART_TIMEOUT_S = 20.0
# the SMART attributes that predict failure (Backblaze, Ceph devicehealth), by id
SMART_IDS = {5, 9, 187, 188, 194, 197, 198, 199}


def space(data_dir: Path) -> tuple[int, int]:
    """(capacity, used) bytes of the filesystem holding DATA_DIR."""
    usage = shutil.disk_usage(data_dir)
    return usage.total, usage.total - usage.free


class LatencyProbe:
    """A timed 4 KiB write+fsync+read in the data directory, recorded in the agent's metrics
    (operation `probe`): the heartbeat's percentiles and histogram come from there."""

    def __init__(self, data_dir: Path, metrics: AgentMetrics) -> None:
        self.path, self.metrics = data_dir / ".latency-probe", metrics
        self._block = os.urandom(PROBE_BYTES)

    def probe(self) -> None:
        start = time.perf_counter()
        failed = False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, self._block, 0)
                os.fsync(fd)
                if os.pread(fd, PROBE_BYTES, 0) != self._block:
                    raise OSError("the probe read back other bytes than it wrote")
            finally:
                os.close(fd)
        except OSError:
            failed = True
        self.metrics.observe_io("probe", time.perf_counter() - start, error=failed)


def backing_disk(data_dir: Path) -> Path | None:
    """The whole-disk sysfs node under DATA_DIR's filesystem (partition → its disk), if any."""
    dev = os.stat(data_dir).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if os.major(dev) == 0 or not node.exists():
        return None  # tmpfs, overlay, btrfs subvolume: no single block device
    node = node.resolve()
    if (node / "partition").exists():
        node = node.parent
    return node if (node / "device").exists() else None  # loop, dm, md have no device


def smart(data_dir: Path) -> dict[str, Any]:
    """`smartctl -j -a` of the disk under DATA_DIR, summarised; "no SMART device" otherwise."""
    disk = backing_disk(data_dir)
    if disk is None:
        return {"status": "no SMART device", "reason": f"{data_dir} is not on a physical disk"}
    device = f"/dev/{disk.name}"
    smartctl = shutil.which("smartctl")
    if smartctl is None:
        return {"status": "no SMART device", "reason": "smartctl is not installed"}
    try:
        run = subprocess.run(
            [smartctl, "-j", "-a", device], capture_output=True, timeout=SMART_TIMEOUT_S
        )
        doc = json.loads(run.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as err:
        return {"status": "no SMART device", "device": device, "reason": str(err)}
    if "smart_status" not in doc:
        messages = [m.get("string", "") for m in doc.get("smartctl", {}).get("messages", [])]
        return {"status": "no SMART device", "device": device, "reason": "; ".join(messages)}
    return {"status": "ok", "devices": {disk.name: summarise(doc)}}


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """The parts of a smartctl JSON document the predictor uses: identity, verdict, attributes."""
    attributes = {
        str(a["id"]): a.get("raw", {}).get("value", 0)
        for a in doc.get("ata_smart_attributes", {}).get("table", [])
        if a.get("id") in SMART_IDS
    }
    summary: dict[str, Any] = {
        "model": doc.get("model_name", ""),
        "serial": doc.get("serial_number", ""),
        "passed": bool(doc.get("smart_status", {}).get("passed", False)),
        "attributes": attributes,
    }
    nvme = doc.get("nvme_smart_health_information_log")
    if nvme:
        summary["nvme"] = {k: v for k, v in nvme.items() if isinstance(v, int)}
    return summary


def drive_models(report: dict[str, Any]) -> list[str]:
    """The drive models in a smart() report, for the server's registration."""
    return sorted({d["model"] for d in report.get("devices", {}).values() if d.get("model")})
