"""The kernel lab driver itself: its cache, its QEMU command line, its timeout."""

import os
import time
from pathlib import Path

import pytest

from tools.kernel_lab import GuestError, GuestResult, run_guest
from tools.kernel_lab.guest import qemu_argv
from tools.kernel_lab.initramfs import base_initramfs, installed_kernel


def test_base_initramfs_is_built_once_per_kernel_and_recipe() -> None:
    kernel = installed_kernel()
    first = base_initramfs(kernel)
    assert kernel.version in first.name and first.stat().st_size > 1 << 20
    stamp = first.stat().st_mtime_ns
    assert base_initramfs(kernel) == first and first.stat().st_mtime_ns == stamp


def test_command_line_has_disks_in_order_net_only_when_asked(tmp_path: Path) -> None:
    kernel = installed_kernel()
    disks = [tmp_path / "a.img", tmp_path / "b.img"]
    argv = qemu_argv(kernel, tmp_path / "initrd", disks, tmp_path, False, False, 256, 1, ["-S"])
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert [d.split(",")[0] for d in drives] == [f"file={d}" for d in disks]
    assert "accel=tcg" in argv[argv.index("-machine") + 1]
    assert "-netdev" not in argv and argv[-1] == "-S"
    with_net = qemu_argv(kernel, tmp_path / "initrd", [], tmp_path, True, True, 256, 1, [])
    assert "user,id=n0" in with_net
    assert "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot" in with_net
    assert "mount_tag=hostroot" not in " ".join(argv)


def test_check_reports_the_console_tail(tmp_path: Path) -> None:
    failed = GuestResult(3, "boot\nKLAB_RC=3", tmp_path, 1.0, 0.5, False)
    with pytest.raises(GuestError, match="rc=3"):
        failed.check()
    assert GuestResult(0, "", tmp_path, 1.0, 0.5, False).check().rc == 0


@pytest.mark.slow
def test_a_guest_that_overruns_is_killed_at_the_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    result = run_guest("#!/bin/sh\nsleep 600\n", [], 4, tmp_path / "out")
    assert result.timed_out and result.rc is None
    assert time.monotonic() - start < 30
    ours = str(tmp_path).encode()  # the QEMU of this test names tmp_path in its -fsdev option
    assert [pid for pid in os.listdir("/proc") if pid.isdigit() and ours in _cmdline(pid)] == []
    with pytest.raises(GuestError, match="timed out"):
        result.check()


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
