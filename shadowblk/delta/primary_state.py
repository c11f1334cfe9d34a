"""What the primary must not forget across a restart (clean or kill -9), in its state folder:

- `replicator.json`: the volume's identity and the epoch numbers reserved so far (numbers are
  reserved in blocks, so a restarted primary never reuses one a shadow may have applied);
- per shadow `shadow-<host>-<port>.json` (last acknowledged epoch) and `.lacks` (a DirtyBitmap
  file): every block the shadow may lack. The saved bitmap is a superset of the exact one:
  before a write into a chunk it does not cover is captured, the whole chunk is marked and the
  bitmap saved, without fsync (for `shadowblk verify`, which reads it live); the checkpoint
  saves it durably;
- per shadow `shadow-<host>-<port>.al`, the activity log: the *hot* chunks, durable (one
  append, one fdatasync) before any write into a chunk that is not hot yet is captured. A chunk
  stays hot (up to a bound, then the checkpoint lets idle ones go), so a busy volume pays no sync
  on its write path. After a crash the shadow lacks at most `.lacks` and the hot chunks.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

import crc32c

from shadowblk.delta.journal import fsync_dir
from shadowblk.tracking.bitmap import BitmapCorruptError, DirtyBitmap

log = logging.getLogger(__name__)

EPOCH_RESERVATION = 1 << 16  # numbers reserved per write of replicator.json (3 syncs)
CHUNK = 4 << 20  # granularity of the persisted superset (as the tracker's regions)
COVER_AHEAD = 15  # chunks covered beyond a sequential writer's position
_AL_RECORD = struct.Struct("<II")  # chunk, crc32c of its 4 bytes


def ahead(chunks: list[int], known: set[int]) -> list[int]:
    """CHUNKS, plus the COVER_AHEAD chunks after each one that follows a chunk in KNOWN (a
    sequential writer): one save per 64 MiB of a sequential stream instead of one per 4 MiB."""
    more = [c + k for c in chunks if c - 1 in known for k in range(1, COVER_AHEAD + 1)]
    return sorted({*chunks, *more})


def write_json(path: Path, data: dict[str, Any], durable: bool = True) -> None:
    """Replace PATH atomically; not DURABLE: without the fsyncs (for a file whose loss after a
    crash is safe, or that a later durable write covers)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, sort_keys=True)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


class PrimaryStateError(Exception):
    """The state folder belongs to another volume or cannot be read."""


def claim(state_dir: Path) -> int:
    """Lock the state folder for this process (released by close or by the process dying):
    two replicators sharing one would each forget what the other shipped."""
    fd = os.open(state_dir / "replicator.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PrimaryStateError(f"{state_dir} is in use by another replicator") from None
    return fd


class EpochCounter:
    """Monotonic epoch numbers that survive restarts.

    A number is handed out only once a durable reservation beyond it is on disk: a restart
    (even after kill -9) then starts from a number no earlier process used. The start's
    reservation is written by a thread, not before `serve` answers (its two syncs were in a
    promoted primary's `go` -> ready, the VM's pause); `take` waits for it, so a crash before
    it is durable restarts from the same base, having handed nothing out."""

    def __init__(self, state_dir: Path, volume_id: str, size: int, block_size: int) -> None:
        self.path = state_dir / "replicator.json"
        self.identity = {"volume_id": volume_id, "size": size, "block_size": block_size}
        reserved = 1
        if self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                reserved = int(raw["reserved"])
                found = {k: raw[k] for k in self.identity}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise PrimaryStateError(f"{self.path}: unreadable ({exc})") from None
            if found != self.identity:
                raise PrimaryStateError(f"{self.path} belongs to {found}, not {self.identity}")
        self.next = reserved
        self.reserved = reserved  # durable: numbers below it may have been handed out before
        self._starting: threading.Thread | None = threading.Thread(
            target=self._reserve_at_start, name="epoch-reservation", daemon=True
        )
        self._starting.start()

    def _reserve_at_start(self) -> None:
        try:
            self._reserve(self.next)
        except OSError as exc:  # `take` tries again, and raises
            log.warning("%s: epoch reservation not written yet: %s", self.path, exc)

    def _settle(self) -> None:
        """Wait for the start's reservation (once)."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None

    def _reserve(self, upto: int) -> None:
        reserved = upto + EPOCH_RESERVATION
        write_json(self.path, {**self.identity, "reserved": reserved})
        self.reserved = reserved  # only once durable

    def take(self) -> int:
        self._settle()
        if self.next >= self.reserved:
            self._reserve(self.next)
        number = self.next
        self.next += 1
        return number

    def skip_past(self, epoch: int) -> None:
        """A shadow has applied EPOCH (state lost here): continue numbering after it."""
        self._settle()  # one writer of the file at a time, the later reservation last
        if epoch >= self.next:
            self.next = epoch + 1
            self._reserve(self.next)


def shadow_name(host: str, port: int) -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", host) + f"-{port}"


class ActivityLog:
    """The hot chunks of one shadow, durable: `add` appends (one fdatasync), `rewrite`
    replaces the file atomically when the checkpoint lets chunks go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self.hot: set[int] = set(self._read())
        if not path.exists():
            self.rewrite([])  # created durably: later appends need no folder sync

    def _read(self) -> list[int]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        chunks = []
        for at in range(0, len(raw) - _AL_RECORD.size + 1, _AL_RECORD.size):
            chunk, crc = _AL_RECORD.unpack_from(raw, at)
            if crc32c.crc32c(raw[at : at + 4]) != crc:
                break  # a torn append: what follows was never relied on
            chunks.append(chunk)
        return chunks

    @staticmethod
    def _records(chunks: list[int]) -> bytes:
        return b"".join(_AL_RECORD.pack(c, crc32c.crc32c(c.to_bytes(4, "little"))) for c in chunks)

    def add(self, chunks: list[int]) -> None:
        """Make CHUNKS (already in `hot`) durable before writes into them are captured."""
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.write(self._fd, self._records(chunks))
        os.fdatasync(self._fd)

    def rewrite(self, chunks: list[int]) -> None:
        """The log becomes exactly CHUNKS (temp file, fsync, rename, fsync of the folder)."""
        self.close()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(self._records(chunks))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ShadowRecord:
    """The primary's durable knowledge of one shadow: last acknowledged epoch and lacks."""

    def __init__(self, state_dir: Path, name: str, size: int, block_size: int) -> None:
        self.json_path = state_dir / f"shadow-{name}.json"
        self.bitmap_path = state_dir / f"shadow-{name}.lacks"
        self.acked = 0  # 0: nothing known, the shadow gets a full sync
        self.persisted = DirtyBitmap(size, block_size)
        self.covered: set[int] = set()  # chunks marked in `persisted` (the saved bitmap)
        self.touched: set[int] = set()  # chunks written since the last checkpoint
        self.log = ActivityLog(state_dir / f"shadow-{name}.al")
        self.save_lock = threading.Lock()
        self.dropped = False  # (save_lock) deleted: nothing may write it back
        if self.json_path.exists() and self.bitmap_path.exists():
            try:
                self.acked = int(json.loads(self.json_path.read_text())["acked"])
                loaded = DirtyBitmap.load(self.bitmap_path)
            except (OSError, ValueError, KeyError, TypeError, BitmapCorruptError):
                self.acked = 0  # unknown: a full sync will rebuild the shadow
            else:
                if (loaded.size, loaded.block_size) == (size, block_size):
                    self.persisted = loaded
                else:
                    self.acked = 0
        for chunk in sorted(self.log.hot):  # written, perhaps not shipped, when we stopped
            if chunk * CHUNK < size:
                self.persisted.mark(chunk * CHUNK, min(CHUNK, size - chunk * CHUNK))
        self.lacks = self.persisted.copy()

    def drop(self) -> None:
        """Delete the record for good (the shadow is no longer shipped to): a later save or
        checkpoint of a link still in flight must not bring back an acked epoch over lacks
        that stopped growing; added again, the shadow then gets a full sync."""
        with self.save_lock:
            self.dropped = True
            self.log.close()
            self.json_path.unlink(missing_ok=True)
            fsync_dir(self.json_path.parent)

    def chunks_missing(self, offset: int, length: int) -> list[int]:
        """Chunks of the range the persisted superset does not cover yet."""
        return [
            c
            for c in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)
            if c not in self.covered
        ]

    def cover(self, chunks: list[int]) -> None:
        """Mark CHUNKS (and those `ahead` of a sequential writer) in the saved superset."""
        size = self.persisted.size
        for c in ahead(chunks, self.covered):
            start = c * CHUNK
            if start >= size:
                break
            self.persisted.mark(start, min(CHUNK, size - start))
            self.covered.add(c)

    def heat(self, offset: int, length: int) -> list[int]:
        """A write is about to be captured: the chunks that must be added to the activity log
        first (now hot; for a sequential writer, with those `ahead`)."""
        chunks = range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)
        self.touched.update(chunks)
        cold = [c for c in chunks if c not in self.log.hot]
        if not cold:
            return []
        last = (self.persisted.size - 1) // CHUNK
        new = [c for c in ahead(cold, self.log.hot) if c <= last and c not in self.log.hot]
        self.log.hot.update(new)
        return new

    def save(self, snapshot: DirtyBitmap, acked: int) -> None:
        """Bitmap first, then the epoch it is relative to (see docs/protocol.md)."""
        snapshot.save(self.bitmap_path)
        write_json(self.json_path, {"acked": acked})

    def show(self, snapshot: DirtyBitmap) -> None:
        """Replace the saved bitmap by a larger one, without fsync: for readers of the live
        record (`shadowblk verify`); durability comes from the activity log."""
        snapshot.save(self.bitmap_path, durable=False)
