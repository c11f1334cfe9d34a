"""Device-mapper control through its ioctls on /dev/mapper/control (linux/dm-ioctl.h).

What `dmsetup` does for us, in-process: no parsing of its output, and no process start inside a
timed window (a process start costs ~0.25 s under QEMU TCG, a suspend/load/resume here a few ms).
Every call takes a 312-byte `struct dm_ioctl` header followed by its data, both in and out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from ioctl_opt import IOWR

CONTROL = Path("/dev/mapper/control")
MAPPER = Path("/dev/mapper")

# struct dm_ioctl, unpacked as a tuple: [0:3] version, [3] data_size, [4] data_start,
# [5] target_count, [6] open_count, [7] flags, [8] event_nr, [9] padding, [10] dev, [11] name,
# [12] uuid, [13] data[7]
HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")
# struct dm_target_spec: sector_start length status next target_type[16]
SPEC = struct.Struct("=QQiI16s")
MSG = struct.Struct("=Q")  # struct dm_target_msg: sector, then the message
assert HEADER.size == 312 and SPEC.size == 40

VERSION = (4, 0, 0)  # any 4.x kernel accepts a request at minor 0
_DM = 0xFD
VERSION_CMD, DEV_CREATE, DEV_REMOVE, DEV_SUSPEND, DEV_STATUS = 0, 3, 4, 6, 7
TABLE_LOAD, TABLE_CLEAR, TABLE_STATUS, TARGET_MSG = 9, 10, 12, 14

SUSPEND_FLAG = 1 << 1
STATUS_TABLE_FLAG = 1 << 4
ACTIVE_PRESENT_FLAG = 1 << 5
BUFFER_FULL_FLAG = 1 << 8
SKIP_LOCKFS_FLAG = 1 << 10
NOFLUSH_FLAG = 1 << 11
DATA_OUT_FLAG = 1 << 16


class DMError(OSError):
    """A device-mapper ioctl failed; errno and the device's name say which and why."""


@dataclass(frozen=True)
class Target:
    """One line of a table: START LENGTH TYPE PARAMS, in 512-byte sectors."""

    start: int
    length: int
    type: str
    params: str

    def line(self) -> str:
        return f"{self.start} {self.length} {self.type} {self.params}"


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    dev: int  # dev_t of /dev/dm-N
    open_count: int
    suspended: bool
    active: bool
    event_nr: int


def _command(nr: int) -> int:
    return IOWR(_DM, nr, HEADER)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode()


def _align8(n: int) -> int:
    return (n + 7) & ~7


class DeviceMapper:
    """An open /dev/mapper/control; one method per ioctl that shadowblk uses."""

    def __init__(self, control: Path = CONTROL) -> None:
        self.fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> DeviceMapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, nr: int, name: str = "", flags: int = 0, data: bytes = b"", targets: int = 0
    ) -> tuple[tuple, bytes]:
        """One ioctl; the header and data that came back (the buffer grows if the kernel asks)."""
        if len(name.encode()) >= 128:  # the kernel's DM_NAME_LEN, with its NUL
            raise DMError(errno.ENAMETOOLONG, f"device-mapper name {name!r}: over 127 bytes")
        size = 16384
        while True:
            buf = bytearray(max(size, HEADER.size + len(data)))
            HEADER.pack_into(buf, 0, *VERSION, len(buf), HEADER.size, targets, 0, flags, 0, 0, 0,
                             name.encode(), b"", b"")  # fmt: skip
            buf[HEADER.size : HEADER.size + len(data)] = data
            try:
                fcntl.ioctl(self.fd, _command(nr), buf, True)
            except OSError as exc:
                what = f"device-mapper {name or 'control'}: {exc.strerror}"
                raise DMError(exc.errno, what) from None
            head = HEADER.unpack_from(buf)
            if head[7] & BUFFER_FULL_FLAG:
                size *= 4
                continue
            return head, bytes(buf[head[4] : head[3]])

    def version(self) -> tuple[int, int, int]:
        head, _ = self._call(VERSION_CMD)
        return head[0], head[1], head[2]

    def create(self, name: str, targets: list[Target]) -> DeviceInfo:
        """Create NAME, load TARGETS and activate them: `dmsetup create NAME --table ...`."""
        self._call(DEV_CREATE, name)
        try:
            self.load(name, targets)
            self.resume(name)
        except DMError:
            with contextlib.suppress(DMError):
                self._call(DEV_REMOVE, name)
            raise
        info = self.info(name)
        make_node(name, info.dev)
        return info

    def remove(self, name: str) -> None:
        self._call(DEV_REMOVE, name)
        remove_node(name)

    def load(self, name: str, targets: list[Target]) -> None:
        """Load TARGETS as NAME's inactive table; a resume swaps it in."""
        data = b""
        for target in targets:
            params = target.params.encode() + b"\0"
            size = _align8(SPEC.size + len(params))
            spec = SPEC.pack(target.start, target.length, 0, size, target.type.encode())
            data += (spec + params).ljust(size, b"\0")
        self._call(TABLE_LOAD, name, data=data, targets=len(targets))

    def clear(self, name: str) -> None:
        """Drop NAME's inactive table (a load that will not be resumed)."""
        self._call(TABLE_CLEAR, name)

    def suspend(self, name: str, flush: bool = True, lockfs: bool = True) -> None:
        """Suspend NAME: new I/O queues, in-flight I/O completes (FLUSH: also what is queued
        in the device). LOCKFS freezes a file system on NAME first, writing its dirty pages
        (or the block device's) inside the suspend; a table swap between two copies of the
        same data does not need that, and a suspend over a dead link must not wait for it."""
        flags = SUSPEND_FLAG | (0 if flush else NOFLUSH_FLAG) | (0 if lockfs else SKIP_LOCKFS_FLAG)
        self._call(DEV_SUSPEND, name, flags)

    def resume(self, name: str, flush: bool = True, lockfs: bool = True) -> None:
        """Resume NAME, swapping in its inactive table when one was loaded. With a table loaded
        and NAME running, the kernel suspends it first (do_resume in dm-ioctl.c, with FLUSH and
        LOCKFS as `suspend` takes them), swaps and resumes, all in this one call: no gap in
        which the caller, descheduled, keeps the device suspended. A failed suspend or swap
        there leaves the loaded table dropped (or, on newer kernels, still loaded)."""
        flags = (0 if flush else NOFLUSH_FLAG) | (0 if lockfs else SKIP_LOCKFS_FLAG)
        self._call(DEV_SUSPEND, name, flags)

    def info(self, name: str) -> DeviceInfo:
        head, _ = self._call(DEV_STATUS, name)
        flags = head[7]
        return DeviceInfo(_cstr(head[11]), head[10], head[6], bool(flags & SUSPEND_FLAG),
                          bool(flags & ACTIVE_PRESENT_FLAG), head[8])  # fmt: skip

    def exists(self, name: str) -> bool:
        try:
            self.info(name)
        except DMError as exc:
            if exc.errno == errno.ENXIO:
                return False
            raise
        return True

    def table(self, name: str) -> list[Target]:
        """The active table: `dmsetup table NAME`."""
        return self._targets(name, STATUS_TABLE_FLAG)

    def status(self, name: str) -> list[Target]:
        """Each target's status line (in `params`): `dmsetup status NAME`."""
        return self._targets(name, 0)

    def _targets(self, name: str, flags: int) -> list[Target]:
        head, data = self._call(TABLE_STATUS, name, flags)
        targets, pos = [], 0
        for _ in range(head[5]):
            start, length, _status, nxt, ttype = SPEC.unpack_from(data, pos)
            params = data[pos + SPEC.size :].split(b"\0", 1)[0].decode()
            targets.append(Target(start, length, _cstr(ttype), params))
            pos = nxt  # for TABLE_STATUS, from the start of the first spec
        return targets

    def message(self, name: str, text: str, sector: int = 0) -> str:
        """Send a target message (`dmsetup message NAME SECTOR TEXT`); its answer, if any."""
        head, data = self._call(TARGET_MSG, name, data=MSG.pack(sector) + text.encode() + b"\0")
        return _cstr(data) if head[7] & DATA_OUT_FLAG else ""


def make_node(name: str, dev: int, udev_wait: float = 2.0) -> Path:
    """/dev/mapper/NAME: left to udev where udevd runs, made here where it does not (or when
    udev has not made it in UDEV_WAIT seconds, e.g. the kernel lab's guest)."""
    path = MAPPER / name
    deadline = time.monotonic() + (udev_wait if Path("/run/udev/control").exists() else 0)
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            os.mknod(path, 0o600 | stat.S_IFBLK, dev)
    return path


def remove_node(name: str) -> None:
    """Drop a /dev/mapper node we made (udev removes its own)."""
    with contextlib.suppress(FileNotFoundError):
        (MAPPER / name).unlink()


def block_device(dev: int) -> Path:
    """The /dev path of a block device number (from sysfs: DEVNAME in its uevent)."""
    uevent = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent").read_text()
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return Path("/dev") / line[8:]
    raise FileNotFoundError(f"no block device {os.major(dev)}:{os.minor(dev)}")
