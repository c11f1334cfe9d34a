"""The kernel's NBD client driven through its ioctls (linux/nbd.h): /dev/nbdN over an export.

We do the handshake ourselves (shadowblk.nbd.client: fixed newstyle, NBD_OPT_GO), then hand the
connected socket, the export's size and its transmission flags to the kernel. NBD_DO_IT blocks
for as long as the device is connected, so a thread holds it; NBD_DISCONNECT ends it.

TIMEOUT (NBD_SET_TIMEOUT, seconds) bounds how long a request waits for the server's answer: past
it the kernel gives up on the connection (the socket is shut down, the request fails with EIO,
NBD_DO_IT returns). The kernel's default, none, lets a request wait for ever on a server whose
host vanished without a reset, which would hold a device-mapper suspend (a switchover) as long.
The default, TIMEOUT_S, is long enough for a slow answer (a sync FLUSH waiting for a slow shadow,
a dying drive's latency spikes) not to become an I/O error: a dead server process or a rebooted
host closes or resets the connection, which ends it at once whatever the timeout
(docs/attach.md). CONNECT_TIMEOUT (seconds) bounds the TCP connect and the handshake.
ON_END is called (from the device's thread) when the connection ends, whatever ended it.

A device is handed out only once the kernel has started it (`pid` in sysfs naming our NBD_DO_IT
thread, the capacity set): before that it has no size and no receiver, a table loaded over it
sees a 0-sector device (docs/attach.md, "Write errors in a dm swap"). `close()` returns once the
kernel has dropped the device's configuration (no `pid` left): the device is free again then.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ioctl_opt import IO

from shadowblk.nbd.client import NBDClient

_NBD = 0xAB
SET_SOCK, SET_BLKSIZE, DO_IT, CLEAR_SOCK = IO(_NBD, 0), IO(_NBD, 1), IO(_NBD, 3), IO(_NBD, 4)
SET_SIZE_BLOCKS, DISCONNECT, SET_TIMEOUT, SET_FLAGS = (
    IO(_NBD, 7),
    IO(_NBD, 8),
    IO(_NBD, 9),
    IO(_NBD, 10),
)
BLOCK = 4096
TIMEOUT_S = 30
SYS_BLOCK = Path("/sys/block")


class KernelNBDError(OSError):
    """No free /dev/nbdN, or the kernel refused the connection."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # no such attribute (yet, or any more)
        return None


def free_devices() -> list[Path]:
    """/dev/nbdN devices with no connection, lowest N first: no `pid` in sysfs (the kernel
    removes it when it drops the device's configuration) and no capacity left."""
    names = sorted((p.name for p in SYS_BLOCK.glob("nbd*")), key=lambda n: int(n[3:]))
    return [Path("/dev") / n for n in names if _free(SYS_BLOCK / n)]


def _free(sysfs: Path) -> bool:
    return _read(sysfs / "pid") is None and _read(sysfs / "size") == "0"


class KernelNBD:
    """One /dev/nbdN connected to an export; `close()` disconnects it."""

    def __init__(
        self,
        host: str,
        port: int,
        name: str,
        timeout: int = TIMEOUT_S,
        on_end: Callable[[], None] | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        self.on_end = on_end
        self.client = NBDClient(host, port, name, timeout=connect_timeout)
        self.size = self.client.size
        self.flags = self.client.flags
        self.client.sock.settimeout(None)  # the kernel reads and writes it from now on
        self.device, self.fd = self._claim(timeout)
        self.ended = threading.Event()
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._do_it, name=f"nbd-{self.device.name}",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        self._wait_started(connect_timeout)

    def _wait_started(self, timeout: float) -> None:
        """Return once the kernel has started the device (NBD_DO_IT got as far as setting the
        receiver's `pid` and the capacity): the thread's start is not that."""
        sysfs = SYS_BLOCK / self.device.name
        sectors = str(self.size // 512)
        deadline = time.monotonic() + timeout
        while not self.ended.is_set() and time.monotonic() < deadline:
            pid = self._thread.native_id
            if _read(sysfs / "pid") == str(pid) and _read(sysfs / "size") == sectors:
                return
            self.ended.wait(0.001)
        why = f"NBD_DO_IT failed: {self.error}" if self.ended.is_set() else "not started in time"
        self.close()
        raise KernelNBDError(errno.EIO, f"{self.device}: {why}")

    def _claim(self, timeout: int) -> tuple[Path, int]:
        """The first free device that takes our socket (another client may race us to one)."""
        if self.size % BLOCK:
            raise KernelNBDError(errno.EINVAL, f"export size {self.size} is not 4 KiB aligned")
        for device in free_devices():
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, SET_SOCK, self.client.sock.fileno())
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EBUSY:
                    continue
                raise
            try:
                fcntl.ioctl(fd, SET_BLKSIZE, BLOCK)
                fcntl.ioctl(fd, SET_SIZE_BLOCKS, self.size // BLOCK)
                fcntl.ioctl(fd, SET_FLAGS, self.flags)
                fcntl.ioctl(fd, SET_TIMEOUT, timeout)
            except OSError:
                fcntl.ioctl(fd, CLEAR_SOCK)
                os.close(fd)
                raise
            return device, fd
        raise KernelNBDError(errno.ENODEV, "no free /dev/nbdN (is the nbd module loaded?)")

    def _do_it(self) -> None:
        try:
            fcntl.ioctl(self.fd, DO_IT)
        except OSError as exc:  # EPIPE/ECONNRESET when the server went away
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, CLEAR_SOCK)
            self.ended.set()
            if self.on_end is not None:
                self.on_end()

    @property
    def connected(self) -> bool:
        return not self.ended.is_set()

    def close(self, timeout: float = 10.0) -> None:
        """Disconnect politely (the kernel sends NBD_CMD_DISC), release the device and wait
        (up to TIMEOUT s) until the kernel has dropped its configuration: another opener
        (udev's probe) can hold it a little longer than our descriptor."""
        deadline = time.monotonic() + timeout
        if not self.ended.is_set():
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, DISCONNECT)
        self._thread.join(timeout)
        os.close(self.fd)
        self.client.close()
        pid = SYS_BLOCK / self.device.name / "pid"
        while _read(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.001)
