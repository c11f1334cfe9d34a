"""What the primary must not forget across a restart (clean or kill -9), in its state folder:

- `replicator.json`: the volume's identity and the epoch numbers reserved so far (numbers are
  reserved in blocks, so a restarted primary never reuses one a shadow may have applied);
- per shadow `shadow-<host>-<port>.json` (last acknowledged epoch) and `.lacks` (a DirtyBitmap
  file): every block the shadow may lack. The persisted bitmap is a superset of the exact one:
  before a write into a chunk it does not cover is captured, the whole chunk is marked and saved.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

from shadowblk.delta.journal import fsync_dir
from shadowblk.tracking.bitmap import BitmapCorruptError, DirtyBitmap

EPOCH_RESERVATION = 1024
CHUNK = 4 << 20  # granularity of the persisted superset (as the tracker's regions)
COVER_AHEAD = 15  # chunks covered beyond a sequential writer's position


def write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
    """Monotonic epoch numbers that survive restarts."""

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
        self.reserved = reserved
        self._reserve(self.next)

    def _reserve(self, upto: int) -> None:
        self.reserved = upto + EPOCH_RESERVATION
        write_json(self.path, {**self.identity, "reserved": self.reserved})

    def take(self) -> int:
        number = self.next
        self.next += 1
        if self.next >= self.reserved:
            self._reserve(self.next)
        return number

    def skip_past(self, epoch: int) -> None:
        """A shadow has applied EPOCH (state lost here): continue numbering after it."""
        if epoch >= self.next:
            self.next = epoch + 1
            self._reserve(self.next)


def shadow_name(host: str, port: int) -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", host) + f"-{port}"


class ShadowRecord:
    """The primary's durable knowledge of one shadow: last acknowledged epoch and lacks."""

    def __init__(self, state_dir: Path, name: str, size: int, block_size: int) -> None:
        self.json_path = state_dir / f"shadow-{name}.json"
        self.bitmap_path = state_dir / f"shadow-{name}.lacks"
        self.acked = 0  # 0: nothing known, the shadow gets a full sync
        self.persisted = DirtyBitmap(size, block_size)
        self.covered: set[int] = set()
        self.save_lock = threading.Lock()
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
        self.lacks = self.persisted.copy()

    def chunks_missing(self, offset: int, length: int) -> list[int]:
        """Chunks of the range the persisted superset does not cover yet."""
        return [
            c
            for c in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)
            if c not in self.covered
        ]

    def cover(self, chunks: list[int]) -> None:
        """Mark CHUNKS in the persisted superset; a chunk that follows a covered one (a
        sequential writer) brings the next COVER_AHEAD chunks with it, so a stream of
        sequential writes costs one save per 64 MiB instead of one per 4 MiB."""
        size = self.persisted.size
        ahead = [c + k for c in chunks if c - 1 in self.covered for k in range(COVER_AHEAD + 1)]
        for c in sorted({*chunks, *ahead}):
            start = c * CHUNK
            if start >= size:
                break
            self.persisted.mark(start, min(CHUNK, size - start))
            self.covered.add(c)

    def save(self, snapshot: DirtyBitmap, acked: int) -> None:
        """Bitmap first, then the epoch it is relative to (see docs/protocol.md)."""
        snapshot.save(self.bitmap_path)
        write_json(self.json_path, {"acked": acked})
