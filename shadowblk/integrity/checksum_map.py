"""The checksum map of a volume: one crc32c per block, memory-mapped, persisted with a header
that lets a missing, torn, corrupt or uncleanly closed map be detected and rebuilt from the data.

File layout (little-endian): a 4 KiB header page, then `blocks` u32 crc32c values.
Header: magic, version, flags (bit 0: closed cleanly), block size, volume size, block count,
epoch (the last epoch whose writes the map covers), crc32c of the entries, crc32c of the header.
A writable open clears the clean flag on disk first, so a crash between a data write and its
map update leaves a map that is rebuilt, never trusted. The last block of a volume whose size is
not a multiple of the block size is checksummed as if zero-padded to a whole block.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import crc32c
import numpy as np

from shadowblk._native.blockcrc import store_crc32c
from shadowblk.integrity.blockcrc import block_crc32c
from shadowblk.integrity.crc_scan import checksum_file, file_size

log = logging.getLogger(__name__)

MAGIC = b"SHBLKCRC"
VERSION = 1
HEADER_BYTES = 4096
DEFAULT_BLOCK_SIZE = 4096
FLAG_CLEAN = 1
LIVE_READS = 3  # a live map's header read this many times at most while it fails its crc
_HEADER = struct.Struct("<8sHHIQQQI")  # magic, version, flags, block size, size, blocks, epoch, crc
_HEADER_CRC = struct.Struct("<I")

ReadBlock = Callable[[int, int], bytes]
"""read(offset, length) -> the volume's current bytes there (short at the end of the volume)."""


class MapBusyError(OSError):
    """The map is open for writing elsewhere (a server): it can be neither used nor rebuilt."""


class MapInvalidError(ValueError):
    """A map file that must not be trusted: missing, torn, corrupt, unclean or of another
    volume. The message says which."""


def _blocks(size: int, block_size: int) -> int:
    return -(-size // block_size)


def _check_geometry(size: int, block_size: int) -> None:
    if block_size < 512 or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} is not a power of two >= 512")
    if size <= 0:
        raise ValueError(f"volume size {size} must be positive")


def _pack_header(flags: int, block_size: int, size: int, epoch: int, entries_crc: int) -> bytes:
    head = _HEADER.pack(
        MAGIC, VERSION, flags, block_size, size, _blocks(size, block_size), epoch, entries_crc
    )
    return head + _HEADER_CRC.pack(crc32c.crc32c(head))


class ChecksumMap:
    """crc32c per block of one volume; `crcs` is a numpy uint32 view of the file's entries."""

    def __init__(self, path: Path, fd: int, writable: bool, header: tuple) -> None:
        self.path = path
        self._fd = fd
        self.writable = writable
        _, _, _, self.block_size, self.size, self.blocks, self.epoch, _ = header
        self.crcs: np.ndarray = np.memmap(
            path,
            dtype="<u4",
            mode="r+" if writable else "r",
            offset=HEADER_BYTES,
            shape=(self.blocks,),
        )
        self.rebuilt_reason: str | None = None
        """Why the map was rebuilt from the data when opened (None: loaded as saved)."""
        self._clean_on_disk = False  # the header on disk says clean: clear it before a change
        self._stamped: tuple[int, int] | None = None  # (entries crc, epoch) of that header

    # --- creating and opening -----------------------------------------------------------------

    @classmethod
    def build(
        cls,
        image: str | os.PathLike[str],
        path: str | os.PathLike[str],
        block_size: int = DEFAULT_BLOCK_SIZE,
        epoch: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> ChecksumMap:
        """Checksum every block of `image` (large sequential reads) into a new map at `path`,
        written atomically, and open it writable."""
        path = Path(path)
        size = file_size(image)
        _check_geometry(size, block_size)
        crcs = checksum_file(image, block_size, progress=progress).astype("<u4", copy=False)
        entries = crcs.tobytes()
        header = _pack_header(FLAG_CLEAN, block_size, size, epoch, crc32c.crc32c(entries))
        _write_atomically(path, header.ljust(HEADER_BYTES, b"\0") + entries)
        return cls.load(path, writable=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str], writable: bool = False) -> ChecksumMap:
        """Open a saved map after checking every field; raises MapInvalidError if it is not
        fit to trust, MapBusyError if a writer has it open. Writable: the map is locked
        (flock) and its clean flag cleared on disk until `close()`."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError:
            raise MapInvalidError(f"{path}: missing") from None
        try:
            _lock(fd, path, writable)
            header = _read_header(fd, path)
            cmap = cls(path, fd, writable, header)
            if crc32c.crc32c(cmap.crcs) != header[-1]:
                raise MapInvalidError(f"{path}: entries do not match their checksum (corrupt)")
        except BaseException:
            os.close(fd)
            raise
        if writable:
            cmap._write_header(clean=False)
        return cmap

    @classmethod
    def open_or_rebuild(
        cls,
        path: str | os.PathLike[str],
        image: str | os.PathLike[str],
        block_size: int | None = None,
        writable: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> ChecksumMap:
        """The map of `image`: loaded if it is valid and of this volume's geometry, otherwise
        rebuilt from the data with a warning (see `rebuilt_reason`). `block_size` None takes
        the saved map's (4096 for a rebuild)."""
        try:
            cmap = cls.load(path, writable=writable)
        except MapInvalidError as exc:
            reason = str(exc)
        else:
            size = file_size(image)
            if (cmap.size, cmap.block_size) == (size, block_size or cmap.block_size):
                return cmap
            reason = (
                f"{path}: geometry {cmap.size} bytes / {cmap.block_size} per block does not "
                f"match {image} ({size} bytes / {block_size})"
            )
            cmap.close()
        log.warning("checksum map not trusted, rebuilding it from the data: %s", reason)
        cmap = cls.build(image, path, block_size or DEFAULT_BLOCK_SIZE, progress=progress)
        cmap.rebuilt_reason = reason
        if not writable:
            cmap.close()
            cmap = cls.load(path)
            cmap.rebuilt_reason = reason
        return cmap

    # --- the write and apply paths ------------------------------------------------------------

    def update(self, offset: int, data: bytes | memoryview, read: ReadBlock | None = None) -> None:
        """Recompute the crcs of the blocks that `data`, written at `offset`, covers.

        Block-aligned data needs nothing else. A write that covers a block only in part needs
        the rest of that block: `read(offset, length)` returns the volume's bytes (before or
        after the write: the written bytes are laid over what it returns).
        """
        self._require_writable()
        self._dirty()
        view = memoryview(data).cast("B")
        end = offset + len(view)
        if offset < 0 or end > self.size or not len(view):
            raise ValueError(f"write offset={offset} length={len(view)} outside the volume")
        bs = self.block_size
        lo = offset - offset % bs
        hi = -(-end // bs) * bs
        if offset == lo and end == hi:
            store_crc32c(self.crcs, bs, ((offset, view),))
            return
        if offset != lo or end not in (hi, self.size):
            if read is None:
                raise ValueError(
                    f"write offset={offset} length={len(view)} is not block-aligned: "
                    "pass read= so the rest of the touched blocks can be read"
                )
            view = self._overlay(lo, hi, offset, view, read)
        elif end != hi:  # a block-aligned write ending at the end of an odd-sized volume
            view = memoryview(bytes(view) + bytes(hi - end))
        self.crcs[lo // bs : hi // bs] = block_crc32c(view, bs)

    def update_whole_blocks(self, writes: Sequence[tuple[int, bytes]], start: int = 0) -> int:
        """The hot path of a batch of writes: checksum them in C straight into the map, from
        index START on, up to the first write that is not whole blocks; returns its index
        (len(writes) when none is), which the caller passes to update()."""
        self._require_writable()
        self._dirty()
        return store_crc32c(self.crcs, self.block_size, writes, start)

    def put_crcs(self, offsets: Sequence[int], lengths: Sequence[int], crcs: np.ndarray) -> None:
        """Whole-block ranges (OFFSETS, LENGTHS in bytes) whose crcs are known already, CRCS one
        per block in order (a shadow's checked frame): stored in one step, none recomputed."""
        self._require_writable()
        bs = self.block_size
        starts = np.asarray(offsets, dtype=np.int64)
        sizes = np.asarray(lengths, dtype=np.int64)
        counts = sizes // bs
        total = int(counts.sum()) if len(counts) else 0
        if (
            len(starts) != len(sizes)
            or (starts % bs).any()
            or (sizes % bs).any()
            or (sizes <= 0).any()
            or (starts < 0).any()
            or (starts + sizes > self.blocks * bs).any()
            or len(crcs) != total
        ):
            raise ValueError(f"{len(crcs)} crcs for ranges that are not whole blocks in the map")
        self._dirty()
        firsts = starts // bs
        index = np.repeat(firsts - (np.cumsum(counts) - counts), counts) + np.arange(total)
        self.crcs[index] = crcs

    def _overlay(
        self, lo: int, hi: int, offset: int, view: memoryview, read: ReadBlock
    ) -> memoryview:
        bs = self.block_size
        buf = bytearray(hi - lo)
        for block in {lo, hi - bs}:
            if block < offset or block + bs > offset + len(view):
                got = read(block, min(bs, self.size - block))
                buf[block - lo : block - lo + len(got)] = got
        buf[offset - lo : offset - lo + len(view)] = view
        return memoryview(buf)

    def update_zero(self, offset: int, length: int, read: ReadBlock | None = None) -> None:
        """The range now reads as zeroes (WRITE_ZEROES, TRIM): whole blocks get the zero-block
        crc without building a buffer; partial blocks at the edges go through `update`."""
        end = offset + length
        if offset < 0 or length <= 0 or end > self.size:
            raise ValueError(f"zero offset={offset} length={length} outside the volume")
        bs = self.block_size
        first = -(-offset // bs)
        last = self.blocks if end == self.size else end // bs  # end of an odd-sized volume
        if first >= last:
            self.update(offset, bytes(length), read=read)
            return
        if offset < first * bs:
            self.update(offset, bytes(first * bs - offset), read=read)
        if end > last * bs:
            self.update(last * bs, bytes(end - last * bs), read=read)
        self._dirty()
        self.crcs[first:last] = zero_block_crc(bs)

    def set_epoch(self, epoch: int) -> None:
        """Record that the map now covers every write up to `epoch` (persisted on flush)."""
        self._require_writable()
        self.epoch = epoch

    def flush(self) -> None:
        """Make the entries durable and stamp the header clean with their checksum, under one
        fsync (the mapping's pages and the header's write both belong to the file: an fsync
        writes them all; msync(MS_SYNC) is the same call on Linux). A crash in that fsync may
        leave the new header with some old entries, or new entries under the old header, which
        says not clean (the first change after a flush wrote it, durably): either way the map
        is rebuilt at the next open, never trusted (the header's crc of the entries tells a
        torn pair). Nothing changed since the last flush (same entries, same epoch, the clean
        header on disk): no write and no sync at all, so that `close` right after a checkpoint
        (a shadow's hand-over in a switchover's pause) costs none. The entries' crc is
        compared, not a flag: a repair writes entries through its own mapping."""
        self._require_writable()
        entries_crc = crc32c.crc32c(self.crcs)
        if self._clean_on_disk and self._stamped == (entries_crc, self.epoch):
            return
        self._write_header(clean=True, entries_crc=entries_crc)

    def close(self) -> None:
        """Flush (writable maps; nothing to write if nothing changed) and release the file."""
        if self._fd < 0:
            return
        if self.writable:
            self.flush()
        self.crcs = np.empty(0, dtype="<u4")  # drops the only reference to the mapping
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> ChecksumMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"{self.path}: opened read-only")

    def _dirty(self) -> None:
        """Before the first change after a flush: the header on disk must stop saying clean."""
        if self._clean_on_disk:
            self._write_header(clean=False)

    def _write_header(self, clean: bool, entries_crc: int = 0) -> None:
        """The header, durably (with the entries: one fsync of the file). Not CLEAN: before
        the first change after a flush, so that a crash mid-change leaves a map never trusted
        (this sync must come before any entry changes)."""
        header = _pack_header(
            FLAG_CLEAN if clean else 0, self.block_size, self.size, self.epoch, entries_crc
        )
        os.pwrite(self._fd, header, 0)
        os.fsync(self._fd)
        self._clean_on_disk = clean
        self._stamped = (entries_crc, self.epoch) if clean else None


_ZERO_CRCS: dict[int, int] = {}


def zero_block_crc(block_size: int) -> int:
    """crc32c of an all-zero block (0x98f94189 for 4 KiB)."""
    if block_size not in _ZERO_CRCS:
        _ZERO_CRCS[block_size] = crc32c.crc32c(bytes(block_size))
    return _ZERO_CRCS[block_size]


class LiveMap:
    """A copy of a map's entries as they are now, read without the lock and without the clean
    flag: the view of a map a running server is writing (its shared mapping is in the page
    cache, so the copy is current). For comparing live volumes only (verify), never for
    trusting a map at rest: entries a writer is changing may be half old, half new."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        for attempt in range(LIVE_READS):  # a header read while its writer rewrites it (a
            # shadow's checkpoint beside a switchover's compare) may be torn: read again
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raise MapInvalidError(f"{path}: missing") from None
            if len(raw) < HEADER_BYTES:
                raise MapInvalidError(f"{path}: {len(raw)} bytes, too short for a map header")
            head = raw[: _HEADER.size]
            magic, _, flags, self.block_size, self.size, self.blocks, self.epoch, _ = (
                _HEADER.unpack_from(head)
            )
            if magic != MAGIC:
                raise MapInvalidError(f"{path}: not a shadowblk checksum map (magic {magic!r})")
            if _HEADER_CRC.unpack_from(raw, _HEADER.size)[0] == crc32c.crc32c(head):
                break
            if attempt == LIVE_READS - 1:
                raise MapInvalidError(f"{path}: header checksum mismatch (corrupt)")
        if len(raw) != HEADER_BYTES + 4 * self.blocks:
            raise MapInvalidError(f"{path}: {len(raw)} bytes for {self.blocks} entries")
        self.path = path
        self.clean = bool(flags & FLAG_CLEAN)
        self.crcs = np.frombuffer(raw, dtype="<u4", offset=HEADER_BYTES).copy()


def _lock(fd: int, path: Path, writable: bool) -> None:
    """Writers hold an exclusive flock for as long as the map is open; readers only check that
    no writer holds it (a map being written is neither trusted nor rebuilt under the writer)."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise MapBusyError(errno.EBUSY, f"{path}: open for writing by another process") from None
    if not writable:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_header(fd: int, path: Path) -> tuple:
    raw = os.pread(fd, _HEADER.size + _HEADER_CRC.size, 0)
    if len(raw) < _HEADER.size + _HEADER_CRC.size:
        raise MapInvalidError(f"{path}: {len(raw)} bytes, too short for a map header (truncated)")
    header = _HEADER.unpack_from(raw)
    magic, version, flags, block_size, size, blocks, _, _ = header
    if magic != MAGIC:
        raise MapInvalidError(f"{path}: not a shadowblk checksum map (magic {magic!r})")
    if _HEADER_CRC.unpack_from(raw, _HEADER.size)[0] != crc32c.crc32c(raw[: _HEADER.size]):
        raise MapInvalidError(f"{path}: header checksum mismatch (corrupt)")
    if version != VERSION:
        raise MapInvalidError(f"{path}: map format version {version}, expected {VERSION}")
    if not flags & FLAG_CLEAN:
        raise MapInvalidError(f"{path}: not closed cleanly (a writer stopped mid-update)")
    try:
        _check_geometry(size, block_size)
    except ValueError as exc:
        raise MapInvalidError(f"{path}: {exc}") from None
    if blocks != _blocks(size, block_size):
        raise MapInvalidError(f"{path}: {blocks} entries for {size} bytes (corrupt)")
    expected = HEADER_BYTES + 4 * blocks
    actual = os.fstat(fd).st_size
    if actual != expected:
        raise MapInvalidError(f"{path}: {actual} bytes, the header implies {expected} (truncated)")
    return header


def _write_atomically(path: Path, content: bytes) -> None:
    """Temp file in the same folder, fsync, rename over `path`, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
