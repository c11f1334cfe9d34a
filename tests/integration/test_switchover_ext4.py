"""ext4 through nbdfuse and a loop device on `attach`, files written and fsynced continuously
while the volume is switched over three times: the writer sees no I/O error, e2fsck -fn finds
the file system clean after unmounting, and every file holds what was written."""

from __future__ import annotations

import hashlib
import random
import subprocess
import threading
from pathlib import Path

from tests.agent_lab import agent_groups_fixture, wait_for  # noqa: F401
from tests.integration.test_replication_ext4 import detach, wait_mounted, writer
from tests.integration.test_serve_clients import run
from tests.procs import Processes
from tests.switchover_lab import start_attach, start_fleet

SEED = 20261128


def test_ext4_on_attach_across_switchovers(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    fleet = start_fleet(procs, agent_groups, tmp_path, mode="sync")
    start_attach(procs, fleet)
    mnt, fuse_dir = tmp_path / "mnt", tmp_path / "fuse"
    mnt.mkdir()
    fuse_dir.mkdir()
    fuse = procs.start(["nbdfuse", str(fuse_dir / "nbd"), fleet.attach_uri], "nbdfuse")
    dev: str | None = None
    mounted = False
    stop, fsyncs, kept = threading.Event(), [0], {}
    thread = threading.Thread(
        target=writer, args=(mnt, random.Random(SEED), stop, fsyncs, kept), daemon=True
    )
    try:
        dev = run(["losetup", "--find", "--show", str(wait_mounted(fuse, fuse_dir))]).stdout
        dev = dev.strip()
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
        run(["mount", dev, str(mnt)])
        mounted = True
        thread.start()
        for i in range(3):
            wanted = 5 * (i + 1)
            wait_for(lambda n=wanted: fsyncs[0] >= n, 60, "files written")
            wait_for(fleet.in_step, 60, "the shadow in step")
            assert fleet.switchover(reason=f"ext4 {i}")["outcome"] == "succeeded"
        wait_for(lambda: fsyncs[0] >= 20, 60, "files written after the last switchover")
        assert thread.is_alive(), "the writer stopped: an I/O error"  # it ends on OSError
        stop.set()
        thread.join(30)
        assert not thread.is_alive()
        sums = {name: hashlib.sha256(data).hexdigest() for name, data in kept.items()}
        run(["umount", str(mnt)])
        mounted = False
        fsck = run(["e2fsck", "-f", "-n", dev], check=False)
        assert fsck.returncode == 0, f"e2fsck -fn: {fsck.returncode}\n{fsck.stdout}{fsck.stderr}"
        run(["mount", dev, str(mnt)])
        mounted = True
        for name, digest in sums.items():
            assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name
    finally:
        stop.set()
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        if dev:
            detach(dev)
        procs.stop(fuse)
        subprocess.run(["fusermount3", "-u", "-z", str(fuse_dir)], capture_output=True)
