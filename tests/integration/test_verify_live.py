"""`shadowblk verify` on a busy volume: a real `serve --shadow` primary and a real `shadowblk
shadow`, a writer doing random writes (aligned, unaligned, zeroes, trims) through NBD the whole
time. 50 compares while it writes must find nothing (blocks in flight are deferred, never
reported); then a block made to diverge on the shadow (its data and its map entry, as a real
divergence would look) must be reported, alone, by the next verify, writes still going on."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import threading
import time
from pathlib import Path

import crc32c

from shadowblk.integrity.checksum_map import HEADER_BYTES, LiveMap
from shadowblk.integrity.discrepancies import DiscrepancyLog
from shadowblk.nbd.client import NBDClient
from shadowblk.tracking.bitmap import DirtyBitmap
from tests.delta_driver import make_key, start_shadow
from tests.integration.test_replication_serve import VOLUME, converged, start_primary
from tests.procs import SHADOWBLK, Processes

MiB = 1 << 20
BS = 4096
BUSY = 32 * MiB  # the writer's region; the rest of the 128 MiB volume is quiet


class Writer(threading.Thread):
    """Random writes in bursts (so that epochs are cut and acknowledged under load), with a
    FLUSH at the end of each burst."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        host_port = url.removeprefix("nbd://").split("/")[0]
        host, port = host_port.rsplit(":", 1)
        self.client = NBDClient(host, int(port), VOLUME)
        self.rng = random.Random(7)
        self.stop = threading.Event()
        self.writes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for _ in range(self.rng.randint(10, 60)):
                    self._one()
                self.client.flush()
                time.sleep(self.rng.uniform(0.0, 0.15))
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _one(self) -> None:
        rng, c = self.rng, self.client
        kind = rng.random()
        if kind < 0.6:
            offset = rng.randrange(0, BUSY // BS) * BS
            c.pwrite(os.urandom(BS * rng.randint(1, 8)), offset)
        elif kind < 0.85:  # unaligned: the map reads the rest of the blocks back
            offset = rng.randrange(0, BUSY - 3 * BS)
            c.pwrite(os.urandom(rng.randint(1, 2 * BS)), offset)
        elif kind < 0.95:
            c.zero(rng.randrange(0, BUSY - 5 * BS), rng.randint(1, 4 * BS))
        else:
            c.trim(rng.randrange(0, BUSY // BS - 4) * BS, BS * rng.randint(1, 4))
        self.writes += 1

    def finish(self) -> None:
        self.stop.set()
        self.join(10)
        self.client.close()
        assert self.error is None, self.error


def verify(state: Path, shadow_dir: Path, *extra: str) -> tuple[int, dict]:
    out = subprocess.run(
        [
            *SHADOWBLK,
            "verify",
            "--state-dir",
            str(state),
            "--shadow-data-dir",
            str(shadow_dir),
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode in (0, 1), out.stdout + out.stderr
    return out.returncode, json.loads(out.stdout)


def diverge(shadow_dir: Path, offset: int) -> int:
    """Write other data to one block of the shadow's image and make its map agree (a real
    divergence, not bit rot: the shadow believes its block); returns the new crc."""
    block = os.urandom(BS)
    with open(shadow_dir / f"{VOLUME}.img", "r+b") as img:
        img.seek(offset)
        img.write(block)
    crc = crc32c.crc32c(block)
    with open(shadow_dir / f"{VOLUME}.map", "r+b") as m:  # the live server maps it shared
        m.seek(HEADER_BYTES + 4 * (offset // BS))
        m.write(struct.pack("<I", crc))
    return crc


def in_flight_record(state: Path) -> list:
    """What the primary's record says the shadow lacks (for failure messages)."""
    return [
        (
            path.name,
            list(DirtyBitmap.load(path).extents())[:5],
            path.with_suffix(".json").read_text(),
        )
        for path in (state / "replication").glob("shadow-*.lacks")
    ]


def test_busy_volume_verify(procs: Processes, tmp_path: Path) -> None:
    key = make_key(tmp_path / "key")
    shadow_dir = tmp_path / "s0"
    _, port = start_shadow(procs, shadow_dir, key, "shadow0")
    _, url = start_primary(procs, tmp_path, [port], key, "async", size="128M")
    state = tmp_path / "state"
    with NBDClient(*url.removeprefix("nbd://").split("/")[0].split(":"), VOLUME) as c:
        c.pwrite(os.urandom(BS), 100 * MiB)  # something outside the busy region too
        c.flush()
    converged(state)

    writer = Writer(url)
    writer.start()
    try:
        code, doc = verify(state, shadow_dir, "--repeat", "50", "--recheck-timeout", "0.3")
        compares = doc["compares"]
        assert len(compares) == 50 and all("error" not in c for c in compares), compares
        assert code == 0 and all(not c["differing"] for c in compares), compares
        assert writer.writes > 200
        assert sum(c["in_flight"] for c in compares) > 0  # the writes were in flight
        assert sum(c["resolved"] for c in compares) > 0  # ... and were rechecked once settled
        assert not DiscrepancyLog.in_state_dir(state).path.exists()

        # a real divergence in the quiet part, while the writer goes on
        target = 120 * MiB + 5 * BS  # beyond the 4 MiB chunks the record covers ahead
        crc = diverge(shadow_dir, target)
        code, doc = verify(state, shadow_dir, "--recheck-timeout", "0.3")
        (report,) = doc["compares"]
        assert code == 1, doc
        assert report["differing_blocks"] == [target // BS], report
        # the busy region's leaves are asked again when rechecked, still less than one map
        assert report["bytes_exchanged"] < 4 * (128 * MiB // BS), report
    finally:
        writer.finish()

    # quiet again: everything settles, and the divergence is still the only difference
    subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", url], check=True, capture_output=True)
    converged(state)
    code, doc = verify(state, shadow_dir)
    (report,) = doc["compares"]
    assert code == 1 and report["differing_blocks"] == [target // BS], report
    assert not report["still_in_flight"], (report, in_flight_record(state))
    assert report["bytes_exchanged"] < 2048, report  # HELLO and one path down the tree
    records = list(DiscrepancyLog.in_state_dir(state).read())
    assert {r.offset for r in records} == {target}
    assert all(r.actual_crc == crc and r.kind == "diverged" for r in records)
    primary = LiveMap(state / "checksums.map")
    assert all(r.expected_crc == int(primary.crcs[target // BS]) for r in records)
