"""The server's health as the agent reports it in heartbeats: space, a cheap latency probe,
the I/O latency and errors of the volumes it serves, and SMART data of the disk under the data
directory when there is a real one.

The probe writes, fsyncs and reads back 4 KiB in the data directory once per heartbeat: it
costs one small synchronous write a second, yet it sees what a volume's writes see when the
disk starts to retry (the latency spike a failing drive shows before it fails).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shadowblk.agent.children import Child
from shadowblk.agent.metrics import AgentMetrics
from shadowblk.nbd.client import NBDClient, NBDError
from shadowblk.nbd.slowdisk import from_environment
from shadowblk.predict.drives import ATTRIBUTES

PROBE_BYTES = 4096
PROBE_READS = 5  # per volume and round: the fastest of them is steadier than one read
VOLUME_PROBE_TIMEOUT_S = 2.0
SMART_TIMEOUT_S = 20.0
# the SMART attributes that predict failure (Backblaze, Ceph devicehealth, the model's), by id
SMART_IDS = {5, 9, 187, 188, 194, 197, 198, 199, *ATTRIBUTES}


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
        self.delay = from_environment()  # test-only: a slow backing store

    def probe(self) -> None:
        start = time.perf_counter()
        failed = False
        time.sleep(self.delay() if self.delay else 0.0)
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


def serving(children: dict[str, Child]) -> dict[str, tuple[str, int]]:
    """The primaries being served, from the hosting's children: endpoint and `serve` pid."""
    return {
        name: (child.url, child.proc.pid)
        for name, child in list(children.items())  # a copy: orders change it meanwhile
        if child.url and child.proc is not None
    }


class VolumeProbe(threading.Thread):
    """Times PROBE_READS random 4 KiB READs through each primary's NBD endpoint every EVERY_S:
    the latency a VM sees, whichever loop serves the volume (a failed or timed-out read is an
    I/O error, and ends that volume's round). The load they were measured at is what the
    volumes' `serve` processes read and wrote meanwhile (/proc/PID/io), in 4 KiB requests a
    second. `window()` hands both to the heartbeat as `io_window`, which the manager's spike
    detector judges; the reads also go into the agent's latency histogram (operation
    `volume-read`). A thread of its own, so a slow or stuck volume never delays a heartbeat
    (whose answer renews the primaries' write leases)."""

    def __init__(
        self,
        metrics: AgentMetrics,
        primaries: Callable[[], dict[str, tuple[str, int]]],
        every_s: float,
    ) -> None:
        super().__init__(name="volume-probe", daemon=True)
        self.metrics, self.primaries, self.every_s = metrics, primaries, every_s
        self.clients: dict[str, tuple[str, NBDClient]] = {}  # volume -> (endpoint, client)
        self.moved: dict[int, int] = {}  # serve pid -> bytes read and written
        self.rng = random.Random(0)
        self.lock = threading.Lock()
        self.times: list[float] = []  # ms, since the last window
        self.errors = self.bytes = 0
        self.since = time.monotonic()

    def run(self) -> None:
        while True:
            self.probe(self.primaries())
            time.sleep(self.every_s)

    def probe(self, primaries: dict[str, tuple[str, int]]) -> None:
        """One round over PRIMARIES (volume -> (nbd:// endpoint, serve pid))."""
        for volume, (url, pid) in sorted(primaries.items()):
            moved = self._moved(pid)
            times, failed = [], False
            while len(times) < PROBE_READS and not failed:
                seconds = self._read(volume, url)
                failed = seconds is None
                seconds = VOLUME_PROBE_TIMEOUT_S if seconds is None else seconds
                self.metrics.observe_io("volume-read", seconds, error=failed)
                times.append(seconds * 1000)
            with self.lock:
                self.times += times
                self.errors += failed
                self.bytes += moved
        for gone in set(self.clients) - set(primaries):
            self.clients.pop(gone)[1].close()

    def window(self) -> dict[str, Any]:
        """What the rounds since the previous window measured."""
        with self.lock:
            times, errors, moved = self.times, self.errors, self.bytes
            self.times, self.errors, self.bytes = [], 0, 0
            now = time.monotonic()
            elapsed, self.since = now - self.since, now
        doc: dict[str, Any] = {"seconds": round(elapsed, 3), "probes": len(times), "errors": errors}
        doc["iops"] = moved / PROBE_BYTES / elapsed if elapsed > 0 else 0.0
        if times:
            doc |= {"min_ms": min(times), "p50_ms": statistics.median(times), "max_ms": max(times)}
        return doc

    def _moved(self, pid: int) -> int:
        """Bytes PID read and wrote since it was last asked (0 the first time)."""
        try:
            text = Path(f"/proc/{pid}/io").read_text()
        except OSError:
            return 0
        fields = dict(line.split(": ") for line in text.splitlines())
        total = int(fields["rchar"]) + int(fields["wchar"])
        before = self.moved.get(pid, total)
        self.moved[pid] = total
        return max(0, total - before)

    def _read(self, volume: str, url: str) -> float | None:
        """Seconds one random READ took; None if it failed (the connection is dropped)."""
        known = self.clients.get(volume)
        try:
            if known is None or known[0] != url:
                parts = urlsplit(url)
                client = NBDClient(parts.hostname or "", parts.port or 0, parts.path.lstrip("/"),
                                   timeout=VOLUME_PROBE_TIMEOUT_S)  # fmt: skip
                known = self.clients[volume] = (url, client)
            client = known[1]
            offset = self.rng.randrange(max(1, client.size // PROBE_BYTES)) * PROBE_BYTES
            start = time.perf_counter()
            client.pread(offset, min(PROBE_BYTES, client.size))
            return time.perf_counter() - start
        except (OSError, NBDError):
            stale = self.clients.pop(volume, None)
            if stale is not None:
                stale[1].close()
            return None


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
