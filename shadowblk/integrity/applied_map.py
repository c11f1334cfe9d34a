"""A shadow's checksum map: DIR/<volume>.map, kept in step with the epochs the applier writes.

The applier calls `applied(kind, offset, length, data)` as each record reaches the image, or
`applied_crcs(offsets, lengths, crcs)` for a frame's runs whose crcs it checked (the
memory-mapped entries change at once, before the epoch is acknowledged, so a live `verify`
reads them) and `committed(epoch)` at a checkpoint, once the image is durable at that epoch and
before the state file records it. `committed` flushes the map (its syncs are off a `sync`
flush's path): after a checkpoint the map on disk is clean, exact, and stamped with the
checkpoint's epoch; from the first record after it the map is marked not clean, so a shadow
that dies before the next checkpoint rebuilds it from the image at the next start. The map is
opened (rebuilt if not trusted) when the volume is created or loaded (`prepare`), else at the
first record.

A failure of the map never fails replication: the map is removed (so nothing trusts it) and
the volume goes on without one until the next start rebuilds it. A map whose epoch is not the
volume's last applied one when it is opened (a leftover, a crash) is rebuilt from the image.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from shadowblk.delta.journal import Kind
from shadowblk.integrity.checksum_map import ChecksumMap

log = logging.getLogger(__name__)


class AppliedMap:
    def __init__(
        self, path: Path, image: Path, block_size: int, last_applied: Callable[[], int]
    ) -> None:
        self.path = path
        self.image = image
        self.block_size = block_size
        self.last_applied = last_applied
        self.map: ChecksumMap | None = None
        self.broken = False

    def _open(self) -> ChecksumMap:
        if self.map is None:
            cmap = ChecksumMap.open_or_rebuild(
                self.path, self.image, self.block_size, writable=True
            )
            expected = self.last_applied()
            if cmap.rebuilt_reason is None and cmap.epoch != expected:
                # a map of another epoch: a leftover of an earlier volume of that id, or one
                # saved just before a crash: rebuilt, not trusted
                log.warning(
                    "%s: map at epoch %d, volume at %d: rebuilding it from the image",
                    self.path,
                    cmap.epoch,
                    expected,
                )
                cmap.close()
                cmap = ChecksumMap.build(self.image, self.path, self.block_size, epoch=expected)
            self.map = cmap
        return self.map

    def prepare(self) -> None:
        """Open (or rebuild) the map now, off the stream's event loop: the applier calls it when
        the volume is created (in a worker thread) and when it is loaded at start-up."""
        if self.broken:
            return
        try:
            self._open()
        except Exception as exc:
            self._fail(exc)

    def _read(self, offset: int, length: int) -> bytes:
        fd = os.open(self.image, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def applied(self, kind: Kind, offset: int, length: int, data: bytes | memoryview) -> None:
        """A record of an epoch was written to the image."""
        if self.broken or not length:
            return
        try:
            cmap = self._open()
            if kind is Kind.DATA:
                cmap.update(offset, data, read=self._read)
            else:
                cmap.update_zero(offset, length, read=self._read)
        except Exception as exc:
            self._fail(exc)

    def applied_crcs(
        self, offsets: Sequence[int], lengths: Sequence[int], crcs: np.ndarray
    ) -> None:
        """Whole-block runs of an epoch were written to the image; CRCS, one per block in
        order, are their checked crc32c (from the frame): stored, not computed again."""
        if self.broken:
            return
        try:
            self._open().put_crcs(offsets, lengths, crcs)
        except Exception as exc:
            self._fail(exc)

    def committed(self, epoch: int) -> None:
        """Every record of EPOCH is on the image (fsynced): stamp the map with it, durably."""
        if self.broken:
            return
        try:
            cmap = self._open()
            cmap.set_epoch(epoch)
            cmap.flush()
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        log.error("checksum map %s dropped (rebuilt at the next start): %s", self.path, exc)
        self.broken = True
        self.path.unlink(missing_ok=True)
        if self.map is not None:
            with contextlib.suppress(Exception):
                self.map.close()  # the file is gone already: nothing can trust what it says
            self.map = None
