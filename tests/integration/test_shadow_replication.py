"""Replication end to end: a Replicator over a real file shipping to real `shadowblk shadow`
processes over loopback TCP, in both modes; the images must be byte-identical (cmp)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shadowblk.delta.replicator import FencedError, Replicator
from tests.delta_driver import (
    Driver,
    durable_epoch,
    file_hash,
    make_key,
    start_shadow,
)
from tests.procs import Processes

SIZE = 16 << 20


def cmp(a: Path, b: Path) -> None:
    out = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def replicator(driver: Driver, ports: list[int], state: Path, key: Path, **kw) -> Replicator:
    return Replicator(
        "vol1",
        driver.fd,
        SIZE,
        [f"127.0.0.1:{p}" for p in ports],
        state,
        hmac_key=key.read_text().encode(),
        cut_interval=None,
        **kw,
    )


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_two_shadows_converge_byte_identical(tmp_path: Path, procs: Processes, mode: str) -> None:
    key = make_key(tmp_path / "key")
    shadows = [start_shadow(procs, tmp_path / f"s{i}", key, f"shadow{i}") for i in range(2)]
    driver = Driver(tmp_path / "primary.img", SIZE, seed=7)
    driver.prefill(40)  # data before replication starts: the full sync carries it, holes stay
    rep = driver.attach(
        replicator(driver, [p for _, p in shadows], tmp_path / "state", key, mode=mode)
    )
    try:
        assert rep.drain(60), rep.status()
        primary_alloc = driver.path.stat().st_blocks * 512
        for i in range(2):
            # the full sync of a sparse volume: holes stay holes, only data crosses the wire
            allocated = (tmp_path / f"s{i}" / "vol1.img").stat().st_blocks * 512
            assert allocated <= primary_alloc + (64 << 10)  # slack: file system metadata
        assert all(s["sent_bytes"] < primary_alloc * 1.1 for s in rep.status()["shadows"])
        for _ in range(12):
            driver.write_some(20)
            if mode == "sync":
                epoch = rep.flush(timeout=30)
                status = rep.status()
                for i, shadow in enumerate(status["shadows"]):
                    # sync mode: a flush returns only once every in-sync shadow applied it
                    assert shadow["in_sync"], status
                    assert shadow["acked_epoch"] >= epoch
                    assert durable_epoch(tmp_path / f"s{i}", "vol1") >= epoch
            else:
                rep.cut_epoch()
        assert rep.drain(60), rep.status()
        status = rep.status()
        assert all(s["in_sync"] and s["connected"] for s in status["shadows"])
        assert status["last_cut_epoch"] > 10
    finally:
        driver.close()
    for i in range(2):
        cmp(driver.path, tmp_path / f"s{i}" / "vol1.img")
        assert durable_epoch(tmp_path / f"s{i}", "vol1") >= status["last_cut_epoch"]


def test_restart_of_both_sides_resyncs_without_full_copy(tmp_path: Path, procs: Processes) -> None:
    """A clean primary restart and a shadow restart: the next stream sends only the lacks."""
    key = make_key(tmp_path / "key")
    proc, port = start_shadow(procs, tmp_path / "s", key, "shadow")
    driver = Driver(tmp_path / "primary.img", SIZE, seed=11)
    rep = driver.attach(replicator(driver, [port], tmp_path / "state", key))
    driver.write_some(200)
    driver.cut()
    assert rep.drain(60), rep.status()
    driver.write_some(30)  # captured, not yet shipped when the primary stops
    rep.close()  # the next replicator finds what the shadow lacks in its state folder
    procs.stop(proc, signal.SIGTERM)
    start_shadow(procs, tmp_path / "s", key, "shadow-again", port=port)
    rep = driver.attach(replicator(driver, [port], tmp_path / "state", key))
    driver.write_some(10)
    driver.cut()
    try:
        assert rep.drain(60), rep.status()
        shadow = rep.status()["shadows"][0]
        assert shadow["phase"] == "streaming"
        assert shadow["catch_up"] == "resync"
        assert shadow["sync_progress"][1] < SIZE // 4, "resync must not be a full copy"
    finally:
        driver.close()
    cmp(driver.path, tmp_path / "s" / "vol1.img")


def wait_synced(data_dir: Path, volume: str, timeout: float = 120) -> None:
    """Until the shadow has made an epoch durable: the initial full sync is over."""
    deadline = time.monotonic() + timeout
    while not (data_dir / f"{volume}.state").exists() or durable_epoch(data_dir, volume) == 0:
        assert time.monotonic() < deadline, "the shadow made no epoch durable"
        time.sleep(0.1)


PRIMARY = """
import sys, time
from pathlib import Path
from shadowblk.delta.replicator import Replicator
from tests.delta_driver import Driver
path, port, state, key = sys.argv[1:5]
driver = Driver(Path(path), int(sys.argv[5]), seed=int(sys.argv[6]))
driver.attach(Replicator("vol1", driver.fd, driver.size, [f"127.0.0.1:{port}"], Path(state),
                         hmac_key=key.encode(), cut_interval=0.2))
print("ready primary", flush=True)
while True:
    driver.write_some(5)
    time.sleep(0.01)
"""


def test_primary_kill9_forgets_nothing(tmp_path: Path, procs: Processes) -> None:
    """kill -9 of a primary in the middle of writing: the next one resyncs what was lost in
    flight from the persisted lacks (never a full copy) and the shadow converges."""
    key = make_key(tmp_path / "key")
    _, port = start_shadow(procs, tmp_path / "s", key, "shadow")
    image, state = tmp_path / "primary.img", tmp_path / "state"
    for seed in (1, 2):
        child = procs.start(
            [
                sys.executable,
                "-c",
                PRIMARY,
                str(image),
                str(port),
                str(state),
                key.read_text(),
                str(SIZE),
                str(seed),
            ],
            f"primary-{seed}",
            cwd=str(Path(__file__).parents[2]),
        )
        procs.wait_ready(child, "ready primary")
        wait_synced(tmp_path / "s", "vol1")  # the kill lands after the full sync, while writing
        time.sleep(2.5)
        procs.stop(child, signal.SIGKILL)
    driver = Driver(image, SIZE, seed=3)
    rep = driver.attach(replicator(driver, [port], state, key))
    try:
        assert rep.drain(60), rep.status()
        shadow = rep.status()["shadows"][0]
        assert shadow["phase"] == "streaming"
        assert shadow["catch_up"] == "resync", "a resync of the lacks, not a full copy"
        assert shadow["sync_progress"][1] > 0
    finally:
        driver.close()
    cmp(image, tmp_path / "s" / "vol1.img")


def test_one_shadow_server_hosts_several_volumes(tmp_path: Path, procs: Processes) -> None:
    key = make_key(tmp_path / "key")
    _, port = start_shadow(procs, tmp_path / "s", key, "shadow")
    drivers = [Driver(tmp_path / f"p{i}.img", SIZE, seed=20 + i) for i in range(3)]
    reps = [
        d.attach(
            Replicator(
                f"vol{i}",
                d.fd,
                SIZE,
                [f"127.0.0.1:{port}"],
                tmp_path / f"state{i}",
                hmac_key=key.read_text().encode(),
                cut_interval=0.1,
            )
        )
        for i, d in enumerate(drivers)
    ]
    try:
        for _ in range(5):
            for d in drivers:
                d.write_some(10)
        assert all(rep.drain(60) for rep in reps), [rep.status() for rep in reps]
    finally:
        for d in drivers:
            d.close()
    for i, d in enumerate(drivers):
        cmp(d.path, tmp_path / "s" / f"vol{i}.img")


def test_a_primary_of_an_older_generation_is_fenced(tmp_path: Path, procs: Processes) -> None:
    """I3: once a shadow holds generation 2, a generation-1 primary may not write any more."""
    key = make_key(tmp_path / "key")
    _, port = start_shadow(procs, tmp_path / "s", key, "shadow")
    new = Driver(tmp_path / "new.img", SIZE, seed=30)
    rep = new.attach(replicator(new, [port], tmp_path / "state-new", key, generation=2))
    new.write_some(5)
    assert rep.drain(60), rep.status()
    new.close()
    image = file_hash(tmp_path / "s" / "vol1.img")
    old = Driver(tmp_path / "old.img", SIZE, seed=31)
    rep = old.attach(replicator(old, [port], tmp_path / "state-old", key, generation=1))
    try:
        deadline = time.monotonic() + 30
        while not rep.status()["fenced"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rep.status()["fenced"], rep.status()
        assert "STALE_GENERATION" in rep.status()["shadows"][0]["last_error"]
        with pytest.raises(FencedError):
            rep.on_write(0, b"z" * 4096)
    finally:
        old.close()
    assert file_hash(tmp_path / "s" / "vol1.img") == image


def test_an_operator_named_device_holds_the_image(tmp_path: Path, procs: Processes) -> None:
    key = make_key(tmp_path / "key")
    device = tmp_path / "device.raw"  # stands in for a block device: an existing, sized file
    with open(device, "wb") as f:
        f.truncate(SIZE)
    extra = ["--volume-path", f"vol1={device}"]
    _, port = start_shadow(procs, tmp_path / "s", key, "shadow", extra=extra)
    driver = Driver(tmp_path / "primary.img", SIZE, seed=40)
    driver.prefill(10)
    rep = driver.attach(replicator(driver, [port], tmp_path / "state", key))
    try:
        driver.write_some(20)
        assert rep.drain(60), rep.status()
    finally:
        driver.close()
    cmp(driver.path, device)
    assert not (tmp_path / "s" / "vol1.img").exists()
