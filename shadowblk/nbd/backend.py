"""Volumes behind the NBD server: a regular file or a block device, behind one narrow interface.

The server only ever calls these methods, so a new kind of volume (or a test double for a
failing disk) is one class. Every method raises OSError with the errno of the failed system
call; the transmission phase turns that into the matching NBD error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class VolumeError(Exception):
    """The volume cannot be served as asked (missing, wrong type, wrong size)."""


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); ctypes drops the GIL for the call."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Backend:
    """A volume opened for serving: positional I/O on one file descriptor."""

    def __init__(self, path: Path, fd: int, size: int, read_only: bool, is_block: bool) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.read_only = read_only
        self.is_block = is_block

    @classmethod
    def open(cls, path: str | os.PathLike[str], size: int | None, read_only: bool) -> Backend:
        """Open PATH; create it as a sparse file of SIZE bytes when it does not exist."""
        path = Path(path)
        if not path.exists():
            if size is None:
                raise VolumeError(f"{path} does not exist (give --size to create it)")
            if read_only:
                raise VolumeError(f"{path} does not exist and --read-only cannot create it")
            if size <= 0:
                raise VolumeError(f"--size must be positive, got {size}")
            with open(path, "xb") as f:
                f.truncate(size)
        st = os.stat(path)
        is_block = stat.S_ISBLK(st.st_mode)
        if not (is_block or stat.S_ISREG(st.st_mode)):
            raise VolumeError(f"{path} is neither a regular file nor a block device")
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        actual = os.lseek(fd, 0, os.SEEK_END)
        if size is not None and size != actual:
            os.close(fd)
            raise VolumeError(f"{path} is {actual} bytes, not the --size {size} asked for")
        if actual <= 0:
            os.close(fd)
            raise VolumeError(f"{path} is empty: nothing to export")
        return cls(path, fd, actual, read_only, is_block)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"short read at {offset}: {len(data)} of {length} bytes")
        return data

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def flush(self) -> None:
        """Make every completed write durable."""
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int) -> None:
        """Discard the range: a hole in a file, a discard on a device; a no-op where unsupported."""
        try:
            if self.is_block:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("=QQ", offset, length))
            else:
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise

    def zero(self, offset: int, length: int, may_trim: bool, fast_only: bool) -> bool:
        """Make the range read as zeroes. Returns False (having changed nothing) when FAST_ONLY
        and no cheaper way than writing zeroes exists."""
        if self.is_block:
            attempts = [
                lambda: fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
            ]
        else:
            modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
            if may_trim:
                modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            attempts = [
                lambda m=m: _fallocate(self.fd, m, offset, length)  # type: ignore[misc]
                for m in modes
            ]
        for attempt in attempts:
            try:
                attempt()
                return True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise
        if fast_only:
            return False
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.pwrite(memoryview(chunk)[:n], offset)
            offset += n
        return True

    def cache(self, offset: int, length: int) -> None:
        """Prefetch hint."""
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, is_hole) runs covering [offset, offset+length), from SEEK_DATA/SEEK_HOLE."""
        end = offset + length
        if self.is_block:
            return [(length, False)]
        runs: list[tuple[int, bool]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = end
            if data > pos:
                stop = min(data, end)
                runs.append((stop - pos, True))
                pos = stop
                continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            stop = min(hole, end)
            runs.append((stop - pos, False))
            pos = stop
        return runs
