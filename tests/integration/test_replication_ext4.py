"""ext4 on a replicated primary, through nbdfuse and a loop device, under a file workload
(create, write, fsync, rename, unlink), with the primary's `serve` killed with SIGKILL at seeded
random moments: after each kill the shadow, stopped cleanly, holds a file system that e2fsck
finds clean once its journal is replayed (I1: the shadow is crash-consistent at an epoch
boundary, and ext4's journal turns that into a clean file system). The next iteration restarts
the primary with the same state folder: the shadow is resynced and the file system is mounted
again (the primary's journal is replayed through the whole chain)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.delta_driver import make_key, start_shadow
from tests.integration.test_replication_serve import VOLUME, converged, start_primary
from tests.integration.test_serve_clients import run
from tests.procs import Processes

SEED = 20261127
ITERATIONS = 3

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: losetup and mount")


KEEP_FILES = 100  # at most ~25 MiB of kept files: the file systems here are 64 MiB


def writer(
    mnt: Path, rng: random.Random, stop: threading.Event, fsyncs: list[int], kept: dict[str, bytes]
) -> None:
    """Files created, written, fsynced, renamed and unlinked until STOP or an I/O error. KEPT
    gets the content of the fsynced files that are never renamed nor unlinked afterwards (the
    newest KEEP_FILES of them: older ones are unlinked)."""
    n = 0
    try:
        while not stop.is_set():
            n += 1
            path = mnt / f"d{n % 4}" / f"f{n}.bin"
            path.parent.mkdir(exist_ok=True)
            data = rng.randbytes(rng.randint(1, 256) * 1024)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsyncs[0] += 1
            if n % 3:
                kept[str(path.relative_to(mnt))] = data
                if len(kept) > KEEP_FILES:  # bounded: a fast volume must not fill the fs
                    oldest = next(iter(kept))
                    (mnt / oldest).unlink()
                    del kept[oldest]
            if n % 3 == 0:
                os.rename(path, path.with_suffix(".old"))
            if n % 5 == 0:
                for old in sorted(path.parent.glob("*.old"))[:-2]:
                    old.unlink()
    except OSError:
        pass  # the NBD server was killed under the file system


def wait_mounted(proc: subprocess.Popen, mountdir: Path) -> Path:
    target = mountdir / "nbd"
    deadline = time.monotonic() + 20
    while not (target.exists() and os.path.ismount(mountdir)):
        assert proc.poll() is None, "nbdfuse exited"
        assert time.monotonic() < deadline, "nbdfuse did not mount"
        time.sleep(0.05)
    return target


def detach(dev: str) -> None:
    """Detach DEV (autoclear once the lazily unmounted ext4 lets go of it) and wait for it."""
    subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        listed = subprocess.run(["losetup", "-n", "-O", "NAME"], capture_output=True, text=True)
        if dev not in listed.stdout.split():
            return
        time.sleep(0.1)
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
    raise AssertionError(f"{dev} is still attached")


def check_image(image: Path, work: Path, kept: dict[str, bytes]) -> None:
    """e2fsck -fn of a copy of IMAGE after replaying its journal, and the files of KEPT hold
    what was written (debugfs reads them from the image)."""
    copy = work / "fsck.img"
    shutil.copyfile(image, copy)
    try:
        replay = run(["e2fsck", "-E", "journal_only", "-y", str(copy)], check=False)
        assert replay.returncode in (0, 1), f"journal replay: {replay.stdout}{replay.stderr}"
        fsck = run(["e2fsck", "-f", "-n", str(copy)], check=False)
        assert fsck.returncode == 0, f"e2fsck -fn: {fsck.returncode}\n{fsck.stdout}{fsck.stderr}"
        for name, data in kept.items():
            got = subprocess.run(
                ["debugfs", "-R", f"cat /{name}", str(copy)], capture_output=True, timeout=30
            ).stdout
            assert got == data, f"{name}: fsynced before the kill, {len(got)} of {len(data)} bytes"
    finally:
        copy.unlink()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_ext4_on_a_killed_primary_leaves_a_clean_shadow(
    procs: Processes, tmp_path: Path, mode: str
) -> None:
    rng = random.Random(f"{SEED}-{mode}")
    key = make_key(tmp_path / "key")
    shadow_dir = tmp_path / "s0"
    image = shadow_dir / f"{VOLUME}.img"
    mnt, fuse_dir = tmp_path / "mnt", tmp_path / "fuse"
    mnt.mkdir()
    fuse_dir.mkdir()
    shadow, port = start_shadow(procs, shadow_dir, key, "shadow0")
    fsynced = 0
    for i in range(ITERATIONS):
        if shadow is None:
            shadow, _ = start_shadow(procs, shadow_dir, key, "shadow0", port=port)
        proc, url = start_primary(procs, tmp_path, [port], key, mode, size="64M")
        converged(tmp_path / "state")  # the shadow caught up with the previous crash
        fuse = procs.start(["nbdfuse", str(fuse_dir / "nbd"), url], "nbdfuse")
        dev: str | None = None
        mounted = False
        thread: threading.Thread | None = None
        stop, fsyncs, kept = threading.Event(), [0], {}
        try:
            target = wait_mounted(fuse, fuse_dir)
            dev = run(["losetup", "--find", "--show", str(target)]).stdout.strip()
            if i == 0:
                run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
            run(["mount", dev, str(mnt)])  # replays the journal left by the previous kill
            mounted = True
            thread = threading.Thread(
                target=writer,
                args=(mnt, random.Random(rng.random()), stop, fsyncs, kept),
                daemon=True,
            )
            thread.start()
            deadline = time.monotonic() + 20
            while fsyncs[0] < 3 and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert fsyncs[0] >= 3, f"iteration {i}: the writer did not get going"
            time.sleep(rng.uniform(0.0, 1.5))
            acknowledged = dict(kept)  # every fsync in it returned before the kill
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            fsynced += fsyncs[0]
        finally:
            stop.set()
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            # the server is gone: end nbdfuse so that every I/O fails at once, then unmount
            # lazily and detach the loop device; nothing here may be skipped
            procs.stop(fuse)
            if mounted:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
            if dev:
                detach(dev)
            subprocess.run(["fusermount3", "-u", "-z", str(fuse_dir)], capture_output=True)
            if thread is not None:
                thread.join(10)
        assert not thread.is_alive(), "the writer is stuck"
        assert procs.stop(shadow, signal.SIGTERM) == 0
        shadow = None
        # sync mode: an fsync returned only once the shadow applied it (I2); async: no promise
        check_image(
            image, tmp_path, dict(list(acknowledged.items())[-8:]) if mode == "sync" else {}
        )
    assert fsynced >= 3 * ITERATIONS
