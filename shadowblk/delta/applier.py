"""The shadow side of one volume: stage an epoch in the journal, make it durable, apply it.

Commit of an epoch (the critical path of a `sync` flush): the staged records and a COMMIT
record in one synchronous write to the preallocated journal (durable from here: recovery would
apply it; `seal`); the records written to the image (page cache, no sync; `apply_next`, which
may run while the next epoch is staged); acknowledged. A
*checkpoint*, off that path (when the journal passes CHECKPOINT_BYTES or CHECKPOINT_SECONDS,
when the stream goes idle or ends), makes the image durable: fdatasync of the image, the
checksum map flushed, the state file replaced with the new `last_applied`, the journal emptied
(a new round from its start). Recovery at start-up re-applies every committed record of a
journal whose last COMMIT is newer than the state (idempotent: records are absolute writes,
replayed in order) and ignores any other, so a crash at any instruction leaves the image at
the state's epoch or at the journal's last committed one, never in between.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from shadowblk.delta.extents import Extents, unpack_extents
from shadowblk.delta.frames import ErrorCode, FrameError, Hello
from shadowblk.delta.journal import (
    ALIGN,
    Journal,
    Kind,
    Record,
    last_commit,
    older_format,
    read_records,
)
from shadowblk.delta.volume_state import StateFileError, VolumeState
from shadowblk.integrity.applied_map import AppliedMap
from shadowblk.nbd.backend import Backend, VolumeError

log = logging.getLogger(__name__)

SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)

HOLD_BYTES = 128 << 20  # staged data kept in memory to apply from, instead of reading it back
CHECKPOINT_BYTES = 256 << 20  # journal size from which a commit is followed by a checkpoint
CHECKPOINT_SECONDS = 5.0  # and the longest a committed epoch waits in the journal for one


class ShadowVolume:
    """One volume hosted by a shadow server: DIR/<id>.state, DIR/<id>.journal and the image,
    DIR/<id>.img unless the operator named a device (or file) for it.

    `applied` is the last epoch made durable (in the journal or, after a checkpoint, on the
    image and in `state.last_applied`): what the shadow reports to a sender."""

    def __init__(self, data_dir: Path, state: VolumeState, device: Path | None = None) -> None:
        self.state = state
        self.applied = state.last_applied
        self.state_path = data_dir / f"{state.volume_id}.state"
        self.image_path = device or data_dir / f"{state.volume_id}.img"
        self.own_image = device is None  # an operator's device is never created or removed
        self.journal = Journal(data_dir / f"{state.volume_id}.journal")
        self._staged_epoch = 0  # highest epoch of a frame staged since the last commit
        self._image: Backend | None = None  # open while a stream feeds the volume
        self._direct = False  # the first epoch of a volume: written to the image, no journal
        self._sealed = False  # a commit's apply failed: the journal must be replayed first
        self._held: list[Record] | None = []  # the staged records, while they fit in HOLD_BYTES
        self._held_bytes = 0
        self._epoch_start = 0  # journal offset of the records staged since the last commit
        # epochs committed to the journal whose records are not (all) on the image yet, oldest
        # first: (epoch, records); an epoch leaves once its last record is on the image
        self._pending: deque[tuple[int, Iterable[Record]]] = deque()
        self._checkpointed = time.monotonic()
        self.checksums = AppliedMap(  # DIR/<id>.map: crc32c per block, for verify and scrub
            data_dir / f"{state.volume_id}.map",
            self.image_path,
            state.block_size,
            lambda: self.state.last_applied,
        )

    @classmethod
    def create(cls, data_dir: Path, hello: Hello, device: Path | None = None) -> ShadowVolume:
        """A new volume: a sparse image of the announced size (or the operator's device, which
        must have exactly that size), no epoch applied."""
        state = VolumeState(hello.volume_id, hello.size, hello.block_size, hello.generation, 0)
        volume = cls(data_dir, state, device)
        try:
            volume.journal.path.unlink(missing_ok=True)  # no state: a leftover is nothing
            if volume.own_image:
                volume.image_path.unlink(missing_ok=True)
            elif not volume.image_path.exists():
                raise VolumeError(f"{volume.image_path} does not exist")
            Backend.open(volume.image_path, hello.size, read_only=False).close()
            state.save(volume.state_path)
            volume.checksums.prepare()
        except (OSError, VolumeError) as exc:
            if volume.own_image:
                volume.image_path.unlink(missing_ok=True)
            raise FrameError(ErrorCode.INTERNAL, f"cannot create volume: {exc}") from None
        return volume

    @classmethod
    def load(cls, data_dir: Path, state_path: Path, device: Path | None = None) -> ShadowVolume:
        volume = cls(data_dir, VolumeState.load(state_path), device)
        volume.recover()
        volume.checksums.prepare()
        return volume

    def recover(self) -> None:
        """Finish the committed epochs a crash left in the journal; drop an incomplete one."""
        if older_format(self.journal.path):
            raise StateFileError(
                f"{self.journal.path}: a journal of an older format; let the version that wrote "
                "it recover it (start and stop that shadow) before this one"
            )
        found = last_commit(self.journal.path)
        if found is not None and found[0] > self.state.last_applied:
            epoch, stop = found
            log.warning("%s: re-applying the journal up to epoch %d", self.state.volume_id, epoch)
            backend = Backend.open(self.image_path, self.state.size, read_only=False)
            try:
                for record in read_records(self.journal.path, 0, stop):
                    self._write(backend, record)
                backend.flush()
            finally:
                backend.close()
            self._record(epoch)
        self.applied = self.state.last_applied
        self.journal.reset()
        self.journal.close()

    def check(self, hello: Hello) -> None:
        """Refuse a HELLO this volume can never take (done before it may supersede a stream)."""
        st = self.state
        if (hello.size, hello.block_size) != (st.size, st.block_size):
            raise FrameError(
                ErrorCode.VOLUME_MISMATCH,
                f"volume {st.volume_id} is {st.size} bytes in blocks of {st.block_size}; "
                f"refusing a stream for {hello.size} bytes in blocks of {hello.block_size}",
            )
        if hello.generation < st.generation:
            raise FrameError(
                ErrorCode.STALE_GENERATION,
                f"volume {st.volume_id} is at generation {st.generation}; "
                f"refusing generation {hello.generation}",
            )

    def accept(self, hello: Hello) -> None:
        """Check a sender's HELLO and record a newer generation it brings."""
        self.check(hello)
        st = self.state
        if hello.generation > st.generation:
            log.info("%s: generation %d -> %d", st.volume_id, st.generation, hello.generation)
            st.generation = hello.generation
            st.save(self.state_path)

    def begin_stream(self) -> None:
        """A new connection: whatever an earlier one staged without committing is void. A volume
        that never reached an epoch has no state to protect: its first epoch (the full sync)
        is written to the image directly, not twice through the journal."""
        if self._sealed:  # an apply failed half-way (I/O error): finish it before anything else
            self._close_image()
            self.journal.close()
            self.recover()
            self._sealed = False
        self.journal.begin()
        self._forget_held()
        self._staged_epoch = 0
        self._epoch_start = self.journal.end
        if self._image is None:
            self._image = Backend.open(self.image_path, self.state.size, read_only=False)
        self._direct = self.applied == 0

    def end_stream(self) -> None:
        """Void what the stream staged; checkpoint what it committed (blocking: run it in a
        thread). A failed apply or checkpoint leaves the journal for recovery."""
        try:
            if not self._sealed:
                self.journal.begin()  # back to the last COMMIT: the rest is void
                self._staged_epoch = 0
                while self._pending:  # committed, acknowledged or not: the image catches up
                    self.apply_next()
                self.checkpoint()
                self.journal.reset()
        except OSError as exc:
            log.error("%s: checkpoint failed, journal kept: %s", self.state.volume_id, exc)
            self._sealed = True
        finally:
            self.journal.close()
            self._forget_held()
            self._pending.clear()  # applied above, or left to recovery (sealed)
            self._staged_epoch = 0
            self._close_image()

    def _close_image(self) -> None:
        if self._image is not None:
            self._image.close()
            self._image = None

    def _check_epoch(self, epoch: int) -> None:
        if epoch <= self.applied:
            raise FrameError(
                ErrorCode.REPLAY,
                f"epoch {epoch} of volume {self.state.volume_id} is already applied "
                f"(last applied {self.applied})",
            )
        if epoch < self._staged_epoch:
            raise FrameError(
                ErrorCode.EPOCH_ORDER,
                f"epoch {epoch} after epoch {self._staged_epoch}: epochs go forward only",
            )

    def stage(
        self, kind: Kind, offset: int, length: int, epoch: int, data: bytes | memoryview = b""
    ) -> None:
        """Append one checked change to the journal (the image is not touched). The record is
        also held in memory, if it fits, so the commit applies it without reading it back."""
        self._check_epoch(epoch)
        self._staged_epoch = epoch
        self._stage(Record(kind, offset, length, epoch, data))

    def stage_extents(self, epoch: int, extents: Extents) -> None:
        """Stage one checked EXTENT frame, however many runs it holds, as one EXTENTS record:
        its head as it came (extent list, block crcs) and its data."""
        self._check_epoch(epoch)
        self._staged_epoch = epoch
        record = Record(Kind.EXTENTS, extents.offsets[0], len(extents.data), epoch, extents)
        self._stage(record, (extents.head, extents.data))

    def _stage(self, record: Record, parts: tuple[bytes | memoryview, ...] | None = None) -> None:
        if self._direct:
            assert self._image is not None
            self._write(self._image, record)
            return
        if parts is None:
            assert not isinstance(record.data, Extents)
            parts = (record.data,)
        self.journal.append_parts(record.kind, record.offset, record.length, record.epoch, parts)
        if self._held is not None:
            self._held_bytes += record.length if record.kind is Kind.EXTENTS else len(parts[0])
            if self._held_bytes > HOLD_BYTES:
                self._held = None
            else:
                self._held.append(record)

    def stages_in_memory(self, nbytes: int) -> bool:
        """Staging a frame of NBYTES of data writes nothing to disk (it fits in the journal's
        buffer, or goes to the image's page cache): quick enough for the event loop."""
        return self._direct or self.journal.room() >= nbytes + ALIGN

    def staged_bytes(self) -> int:
        """Data staged since the last commit (while it is held in memory; else a large figure)."""
        return self._held_bytes if self._held is not None else HOLD_BYTES + 1

    def _forget_held(self) -> None:
        self._held, self._held_bytes = [], 0

    def mark_epoch_end(self, epoch: int) -> None:
        """An EPOCH_END with the merge flag: staged, committed with a later epoch."""
        self._check_epoch(epoch)
        self._staged_epoch = epoch

    def commit(self, epoch: int) -> None:
        """Make the staged epoch durable and apply it; blocking (run it in a thread). Returns
        once the epoch may be acknowledged: in the journal, durably, and on the image."""
        self.seal(epoch)
        while self._pending:
            self.apply_next()

    def seal(self, epoch: int) -> None:
        """Make the staged epoch durable (the journal's COMMIT record, or the first epoch's
        image fdatasync) and queue its records for the image (`apply_next`); blocking.

        Staging the next epoch may start at once, while this one's records go to the image
        in another thread: the journal and the image are separate files, and recovery
        replays every committed epoch in order, so a crash at any instruction of either
        still leaves the shadow at an epoch boundary once recovered (I1). The epoch counts as
        applied (`applied`: durable, what WELCOME and PONG report) from here; it is
        acknowledged only once on the image (`apply_next`), and a checkpoint waits until
        nothing is pending."""
        self._check_epoch(epoch)
        assert self._image is not None
        if self._direct:
            self._image.flush()
            self._record(epoch)
            self._direct = False
            # on the image already, but queued all the same: the stream's image task takes
            # one pending entry per sealed epoch, in step with its own queue
            self._pending.append((epoch, ()))
        else:
            self.journal.commit(epoch)
            records: Iterable[Record] | None = self._held
            if records is None:  # this epoch's records only: later ones may be staged meanwhile
                records = read_records(self.journal.path, self._epoch_start, self.journal.end)
            self._pending.append((epoch, records))
        self.applied = epoch
        self._forget_held()
        self._staged_epoch = 0
        self._epoch_start = self.journal.end

    def apply_next(self) -> None:
        """Write the oldest sealed epoch's records to the image (page cache) and the checksum
        map (nothing for a first epoch, written to the image as it was staged); blocking, one
        caller at a time. The epoch may be acknowledged from then on: durable in the journal,
        and on the image where the read-only export and `verify` read it. A failure half-way
        leaves the volume sealed: its next stream replays the journal first."""
        if not self._pending:
            return
        _, records = self._pending[0]
        assert self._image is not None
        self._sealed = True
        for record in records:
            self._write(self._image, record)
        self._sealed = False
        self._pending.popleft()

    def pending(self) -> int:
        """Epochs sealed in the journal that are not on the image yet."""
        return len(self._pending)

    def write_back(self) -> None:
        """Start writing the image's dirty pages back, so the next checkpoint's fdatasync
        finds little left to do (it would otherwise hold the stream for the writeback of
        seconds of random writes). Blocking while the kernel takes the I/O (tens of ms for a
        few MiB): call it after the epoch's acknowledgement, in a worker thread."""
        if self._image is not None:
            start_writeback(self._image.fd)

    def cheap_commit(self, limit: int) -> bool:
        """The staged epoch holds at most LIMIT bytes and commits through the journal: one
        small fdatasync, quick enough to run on the event loop."""
        return not self._direct and self._held is not None and self._held_bytes <= limit

    def checkpoint_due(self) -> bool:
        """The journal is big or old enough that the image should catch up now."""
        return self.needs_checkpoint() and (
            self.journal.committed_end >= CHECKPOINT_BYTES
            or time.monotonic() - self._checkpointed > CHECKPOINT_SECONDS
        )

    def checkpoint(self) -> None:
        """Make the image durable and record the last committed epoch as applied, so the
        journal can be emptied; blocking. Nothing to do while part of an epoch is staged."""
        self._checkpointed = time.monotonic()
        if (
            self.applied <= self.state.last_applied
            or self.journal.end != self.journal.committed_end
            or self._pending  # the image does not hold every committed epoch yet
        ):
            return
        assert self._image is not None
        self._image.flush()
        self._record(self.applied)
        self.journal.reset()
        self._epoch_start = 0

    def needs_checkpoint(self) -> bool:
        """Committed epochs wait in the journal and nothing is half staged."""
        return self.applied > self.state.last_applied and not self._staged_epoch

    def _write(self, backend: Backend, record: Record) -> None:
        """One record onto the image, and into the checksum map (in memory until flushed)."""
        kind, offset, length, data = record.kind, record.offset, record.length, record.data
        if kind is Kind.EXTENTS:
            if not isinstance(data, Extents):  # read back from the journal
                data = unpack_extents(data, length, self.state.block_size)
            self._write_extents(backend, data)
            return
        assert not isinstance(data, Extents)
        if kind is Kind.DATA:
            backend.pwrite(data, offset)
        elif kind is Kind.ZERO:
            backend.zero(offset, length, may_trim=False, fast_only=False)
        elif kind is Kind.TRIM:
            backend.zero(offset, length, may_trim=True, fast_only=False)
        else:
            return
        self.checksums.applied(kind, offset, length, data)

    def _write_extents(self, backend: Backend, extents: Extents) -> None:
        """A frame's runs onto the image, a pwrite each, and their crcs (checked on arrival)
        into the checksum map as they are: none computed again."""
        view = memoryview(extents.data).cast("B")
        at = 0
        for offset, length in zip(extents.offsets, extents.lengths, strict=True):
            backend.pwrite(view[at : at + length], offset)
            at += length
        self.checksums.applied_crcs(extents.offsets, extents.lengths, extents.crcs())

    def _record(self, epoch: int) -> None:
        """The image is durable at EPOCH: stamp the map, then the state file."""
        self.checksums.committed(epoch)
        self.state.last_applied = epoch
        self.state.save(self.state_path)
        self.applied = max(self.applied, epoch)


def start_writeback(fd: int) -> None:
    """Have the kernel start writing FD's dirty pages back (the GIL released; it returns once
    the I/O is submitted, not done): a hint, never a durability point; without
    sync_file_range nothing changes but timing."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
