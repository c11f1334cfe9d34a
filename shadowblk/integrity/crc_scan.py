"""Checksum a whole file or block device block by block, as fast as the device reads: the map
build and the scrub both use it.

Worker threads (one per core by default) take the next chunk in file order, read it into
their own small page-aligned buffer (it stays in the CPU cache for the crc that follows) and
store its blocks' crc32c in one shared array; reads and crcs release the GIL. The kernel sees
one sequential stream. Optionally O_DIRECT; by default each chunk is dropped from the page
cache after it is read, so a scrub does not push the volume's hot data out of memory.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Callable

import numpy as np

from shadowblk.integrity.blockcrc import block_crc32c
from shadowblk.integrity.rate_limit import TokenBucket

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1 << 20
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
    """The state the workers share: the next chunk to take, the output, progress, errors."""

    def __init__(self, fd: int, size: int, block_size: int, chunk_size: int) -> None:
        self.fd = fd
        self.size = size
        self.block_size = block_size
        self.chunk_size = chunk_size
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
            self._next += self.chunk_size
            return offset

    def finished(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes

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
    rate: TokenBucket | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The crc32c of every block of the file (the last block zero-padded to a whole block).

    `progress(nbytes)` is called from the calling thread, every 0.1 s and at the end, with the
    bytes checksummed since the previous call.
    """
    if chunk_size % block_size or chunk_size % mmap.PAGESIZE:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of {block_size} and a page")
    fd, direct = _open(path, direct)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        state = _Scan(fd, size, block_size, chunk_size)
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        threads = [
            threading.Thread(target=_worker, args=(state, direct, drop_cache, rate), daemon=True)
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


def _worker(state: _Scan, direct: bool, drop_cache: bool, rate: TokenBucket | None) -> None:
    buf = mmap.mmap(-1, state.chunk_size)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    bs = state.block_size
    try:
        while (offset := state.take()) is not None:
            want = min(state.chunk_size, state.size - offset)
            if rate is not None:
                rate.take(want)
            got = _read_fully(state.fd, view, offset, want, direct)
            if drop_cache and not direct:
                os.posix_fadvise(state.fd, offset, got, os.POSIX_FADV_DONTNEED)
            padded = -(-got // bs) * bs
            view[got:padded] = bytes(padded - got)
            first = offset // bs
            state.crcs[first : first + padded // bs] = block_crc32c(view[:padded], bs)
            state.finished(got)
    except BaseException as exc:  # re-raised by checksum_file in the calling thread
        state.failed(exc)


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
