"""The primary's checksum map: a WriteObserver that keeps STATE_DIR/checksums.map (one crc32c
per block, shadowblk.integrity.checksum_map) in step with every write, zero and trim.

The tracker calls observers with `ordering` held, before the volume is changed, so the map is
updated before the write is acknowledged and in the order the volume sees the writes. A write
that covers part of a block reads the rest of that block from the backend (under `ordering`
no other write can change it meanwhile) and lays the new bytes over it. Attach it after the
replication observer: a write the replicator refuses (fenced) must not reach the map either.

Durability: the map is marked not clean on disk from the first change after a flush; it is
flushed (entries fsynced, header stamped clean with the epoch last cut) every CHECKPOINT
seconds when it changed, and at a clean stop. A primary killed between two checkpoints leaves
a map that is rebuilt from the data at the next start, never trusted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from shadowblk.integrity.checksum_map import ChecksumMap
from shadowblk.nbd.backend import Backend

log = logging.getLogger(__name__)

MAP_FILE = "checksums.map"
CHECKPOINT = 30.0


class ChecksumObserver:
    """Updates the volume's checksum map before each change is made."""

    def __init__(
        self,
        state_dir: Path,
        backend: Backend,
        block_size: int,
        epoch: Callable[[], int] | None = None,
        checkpoint: float = CHECKPOINT,
    ) -> None:
        self.backend = backend
        self.epoch = epoch  # the last epoch cut (replicated volumes), recorded at each flush
        self.map = ChecksumMap.open_or_rebuild(
            state_dir / MAP_FILE, backend.path, block_size, writable=True
        )
        if self.map.rebuilt_reason:
            log.info("checksum map rebuilt: %s", self.map.rebuilt_reason)
        self._lock = threading.Lock()
        self._changed = False
        self._stop = threading.Event()
        self._saver = threading.Thread(
            target=self._save_loop, args=(checkpoint,), name="checksum-map", daemon=True
        )
        self._saver.start()

    def _read(self, offset: int, length: int) -> bytes:
        return self.backend.pread(offset, length)

    # --- WriteObserver -----------------------------------------------------------------------

    def on_write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.map.update(offset, data, read=self._read)
            self._changed = True

    def on_zero(self, offset: int, length: int) -> None:
        with self._lock:
            self.map.update_zero(offset, length, read=self._read)
            self._changed = True

    def on_writes(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """A batch from the native loop, none of it on the volume yet: whole-block writes are
        checksummed in C; the rest of a partially written block is read from the volume with
        the batch's earlier writes laid over it. In order, so a later write of a block wins."""
        with self._lock:
            i = 0
            while (i := self.map.update_whole_blocks(writes, i)) < len(writes):
                offset, data = writes[i]
                earlier = writes[:i]
                self.map.update(
                    offset, data, read=lambda at, n, e=earlier: _overlaid(self._read(at, n), at, e)
                )
                i += 1
            self._changed = True

    def on_trim(self, offset: int, length: int) -> None:
        self.on_zero(offset, length)  # a trimmed range reads as zeroes on a file or a device
        # that zeroes discarded blocks; a device that does not is scrubbed, not trusted here

    def on_flush(self) -> None:
        pass

    # --- persistence -------------------------------------------------------------------------

    def checkpoint(self) -> None:
        with self._lock:
            if not self._changed:
                return
            if self.epoch is not None:
                self.map.set_epoch(self.epoch())
            self.map.flush()
            self._changed = False

    def _save_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.checkpoint()
            except OSError:
                log.exception("checkpoint of the checksum map failed (it stays not clean)")

    def close(self) -> None:
        """At a clean stop, after the last write: flush and release the map."""
        self._stop.set()
        if self._saver.is_alive():
            self._saver.join()
        with self._lock:
            if self.epoch is not None:
                self.map.set_epoch(self.epoch())
            self.map.close()


def _overlaid(base: bytes, at: int, writes: Sequence[tuple[int, bytes]]) -> bytes:
    """BASE, the volume's bytes at AT, as they will be once WRITES (in order) are issued."""
    buf = bytearray(base)
    end = at + len(buf)
    for offset, data in writes:
        lo, hi = max(at, offset), min(end, offset + len(data))
        if lo < hi:
            buf[lo - at : hi - at] = data[lo - offset : hi - offset]
    return bytes(buf)
