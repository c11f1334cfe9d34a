"""Checksum a whole file or block device block by block, as fast as the device reads: the map
build and the scrub both use it.

Worker threads (one per core by default) take the next window in file order and store its
blocks' crc32c in one shared array; reads and crcs release the GIL. The kernel sees the file
read in order, a window per worker at a time. By default each window the scan reads from the
device is dropped from the page cache once checksummed, and a window already cached is left
there, so a scrub does not push the volume's hot data out of memory.

Reads go by chunks (1 MiB) with pread into a page-aligned buffer per worker (as O_DIRECT
needs), checksummed while in the CPU cache. A buffered scan first maps each window (32 MiB)
and asks `mincore` whether it is in the page cache (one page per MiB): if so, it checksums the
cache's own pages in place, 4 MiB at a time, with no copy (the copy is most of a read's CPU
when the data is cached). Each step is populated first with MADV_POPULATE_READ, which returns
an error instead of raising SIGBUS if a page cannot be read after all (evicted meanwhile, then
a media error, or the file shrank): that step is then read with pread, which reports it.
Kernels without MADV_POPULATE_READ (before 5.14) always use pread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable

import numpy as np

from shadowblk.integrity.blockcrc import block_crc32c
from shadowblk.integrity.rate_limit import TokenBucket

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1 << 20  # bytes read with pread, rate-limited and checksummed at once
IN_PLACE_STEP = 4 << 20  # the same for cached pages checksummed in place (no buffer to fit)
MAP_WINDOW = 32 << 20  # bytes a worker maps at once (mapping costs a system call each way)
MADV_POPULATE_READ = 22  # Linux 5.14+; not in Python 3.11's mmap module
PROGRESS_INTERVAL = 0.1  # seconds between progress callbacks


def file_size(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a regular file or a block device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _open(path: str | os.PathLike[str], direct: bool) -> tuple[int, bool]:
    if direct:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError as exc:
            log.warning(
                "%s: O_DIRECT not available (%s), reading through the page cache", path, exc
            )
    return os.open(path, os.O_RDONLY), False


class _Scan:
    """The state the workers share: the next window to take, the output, progress, errors."""

    def __init__(self, fd: int, size: int, block_size: int, chunk_size: int) -> None:
        self.fd = fd
        self.size = size
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.step = chunk_size * max(1, IN_PLACE_STEP // chunk_size)
        self.window = -(-MAP_WINDOW // self.step) * self.step  # what take() hands out
        self.crcs = np.empty(-(-size // block_size), dtype=np.uint32)
        self.done = 0
        self.error: BaseException | None = None
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """The offset of the next chunk, or None when all are taken or a worker failed."""
        with self._lock:
            if self._next >= self.size or self.error is not None:
                return None
            offset = self._next
            self._next += self.window
            return offset

    def finished(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes

    def store(self, offset: int, data: memoryview, got: int) -> None:
        """Checksum DATA (GOT bytes read at OFFSET; the last block zero-padded to a whole
        block, in a copy) into the shared array."""
        bs = self.block_size
        whole = got // bs * bs
        first = offset // bs
        if whole:
            self.crcs[first : first + whole // bs] = block_crc32c(data[:whole], bs)
        if whole < got:
            tail = bytes(data[whole:got]) + bytes(bs - (got - whole))
            self.crcs[first + whole // bs] = block_crc32c(tail, bs)[0]
        self.finished(got)

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.error = self.error or exc


def checksum_file(
    path: str | os.PathLike[str],
    block_size: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    workers: int | None = None,
    direct: bool = False,
    drop_cache: bool = True,
    in_place: bool = True,
    rate: TokenBucket | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The crc32c of every block of the file (the last block zero-padded to a whole block).

    IN_PLACE: checksum cached windows through a mapping (no copy); a long-lived daemon passes
    False, since a media error on a mapped page is a SIGBUS that would kill it, not an OSError.

    `progress(nbytes)` is called from the calling thread, every 0.1 s and at the end, with the
    bytes checksummed since the previous call.
    """
    if chunk_size % block_size or chunk_size % mmap.PAGESIZE:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of {block_size} and a page")
    fd, direct = _open(path, direct)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        state = _Scan(fd, size, block_size, chunk_size)
        in_place = in_place and not direct and _can_populate(fd, size)
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        threads = [
            threading.Thread(
                target=_worker, args=(state, direct, in_place, drop_cache, rate), daemon=True
            )
            for _ in range(workers or min(os.cpu_count() or 1, 4))
        ]
        for thread in threads:
            thread.start()
        reported = 0
        for thread in threads:
            while thread.is_alive():
                thread.join(PROGRESS_INTERVAL)
                if progress is not None and state.done > reported:
                    progress(state.done - reported)
                    reported = state.done
        if state.error is not None:
            raise state.error
        if progress is not None and state.done > reported:
            progress(state.done - reported)
        return state.crcs
    finally:
        os.close(fd)


def _can_populate(fd: int, size: int) -> bool:
    """Whether this kernel has MADV_POPULATE_READ (and the file can be mapped at all)."""
    if not size:
        return False
    try:
        with mmap.mmap(fd, min(size, mmap.PAGESIZE), prot=mmap.PROT_READ) as probe:
            probe.madvise(MADV_POPULATE_READ, 0, len(probe))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENODEV, errno.EACCES):
            raise  # a media error on the first page: reported like any read error
        log.info("cannot map and populate (%s): reading with pread", exc)
        return False
    return True


def _worker(
    state: _Scan, direct: bool, in_place: bool, drop_cache: bool, rate: TokenBucket | None
) -> None:
    buf = mmap.mmap(-1, state.chunk_size)
    view = memoryview(buf)
    try:
        while (offset := state.take()) is not None:
            length = min(state.window, state.size - offset)
            if in_place and _checksum_cached(state, offset, length, rate):
                continue  # cached before the scan: the volume's working set, left in place
            for start in range(offset, offset + length, state.chunk_size):
                want = min(state.chunk_size, offset + length - start)
                if rate is not None:
                    rate.take(want)
                state.store(start, view, _read_fully(state.fd, view, start, want, direct))
            if drop_cache and not direct:
                os.posix_fadvise(state.fd, offset, length, os.POSIX_FADV_DONTNEED)
    except BaseException as exc:  # re-raised by checksum_file in the calling thread
        state.failed(exc)


def _checksum_cached(state: _Scan, offset: int, length: int, rate: TokenBucket | None) -> bool:
    """Checksum the window in place if all of it is in the page cache; False (nothing done)
    if not."""
    with mmap.mmap(state.fd, length, prot=mmap.PROT_READ, offset=offset) as pages:
        if not _all_cached(pages, DEFAULT_CHUNK):
            return False
        view = memoryview(pages)
        try:
            for start in range(0, length, state.step):
                n = min(state.step, length - start)
                if rate is not None:
                    rate.take(n)
                try:
                    pages.madvise(MADV_POPULATE_READ, start, n)
                except OSError:  # unreadable after all: pread says why (EIO, the file shrank)
                    copy = memoryview(bytearray(n))
                    got = _read_fully(state.fd, copy, offset + start, n, direct=False)
                    state.store(offset + start, copy, got)
                    continue
                state.store(offset + start, view[start : start + n], n)
        finally:
            view.release()
    return True


_mincore = ctypes.CDLL(None, use_errno=True).mincore
_mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def _all_cached(pages: mmap.mmap, stride: int) -> bool:
    """Whether a file mapping is in the page cache, judged by mincore(2) on one page every
    STRIDE bytes: a full check walks the cache page by page (a tenth of the scan's CPU). A
    window misjudged cached is still read right, only more slowly (by page faults)."""
    vec = ctypes.c_ubyte()
    address = np.frombuffer(pages, dtype=np.uint8).ctypes.data  # the array is freed on return
    for offset in range(0, len(pages), stride):
        if _mincore(address + offset, 1, ctypes.byref(vec)) != 0 or not vec.value & 1:
            return False
    return True


def _read_fully(fd: int, view: memoryview, offset: int, want: int, direct: bool) -> int:
    """Read `want` bytes at `offset` (O_DIRECT: rounded up to whole pages; the end of the file
    cuts that short). Raises if the file ends before `want` bytes."""
    end = -(-want // mmap.PAGESIZE) * mmap.PAGESIZE if direct else want
    got = 0
    while got < want:
        n = os.preadv(fd, [view[got:end]], offset + got)
        if n == 0:
            raise OSError(f"file shrank during the scan: end of file at {offset + got}")
        got += n
    return want
