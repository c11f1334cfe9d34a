"""The shadow side of one volume: stage an epoch in the journal, make it durable, apply it.

Commit order (each step durable before the next): COMMIT record + fsync of the journal; the
records written to the image; fsync of the image; the state file replaced with the new
`last_applied`; the journal removed. Recovery at start-up re-applies a committed journal whose
epoch is newer than the state (idempotent: records are absolute writes) and drops any other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shadowblk.delta.frames import ErrorCode, FrameError, Hello
from shadowblk.delta.journal import Journal, Kind, Record, committed_epoch, read_records
from shadowblk.delta.volume_state import VolumeState
from shadowblk.integrity.applied_map import AppliedMap
from shadowblk.nbd.backend import Backend, VolumeError

log = logging.getLogger(__name__)

HOLD_BYTES = 128 << 20  # staged data kept in memory to apply from, instead of reading it back


class ShadowVolume:
    """One volume hosted by a shadow server: DIR/<id>.state, DIR/<id>.journal and the image,
    DIR/<id>.img unless the operator named a device (or file) for it."""

    def __init__(self, data_dir: Path, state: VolumeState, device: Path | None = None) -> None:
        self.state = state
        self.state_path = data_dir / f"{state.volume_id}.state"
        self.image_path = device or data_dir / f"{state.volume_id}.img"
        self.own_image = device is None  # an operator's device is never created or removed
        self.journal = Journal(data_dir / f"{state.volume_id}.journal")
        self._staged_epoch = 0  # highest epoch of a frame staged since the last commit
        self._direct: Backend | None = None  # the image, while its first epoch is written
        self._sealed = False  # the journal holds a committed epoch not yet recorded as applied
        self._held: list[Record] | None = []  # the staged records, while they fit in HOLD_BYTES
        self._held_bytes = 0
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
            if volume.own_image:
                volume.image_path.unlink(missing_ok=True)  # no state: a leftover is nothing
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
        """Finish a committed epoch a crash interrupted; drop an incomplete one."""
        epoch = committed_epoch(self.journal.path)
        if epoch is not None and epoch > self.state.last_applied:
            log.warning("%s: re-applying committed epoch %d", self.state.volume_id, epoch)
            self._apply(epoch)
        elif self.journal.path.exists():
            log.warning("%s: dropping an incomplete staged epoch", self.state.volume_id)
        self.journal.drop()

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
        if self._sealed:  # a commit failed half-way (I/O error): finish it before anything else
            self.recover()
            self._sealed = False
        self.journal.begin()
        self._forget_held()
        self._staged_epoch = 0
        if self.state.last_applied == 0 and self._direct is None:
            self._direct = Backend.open(self.image_path, self.state.size, read_only=False)

    def end_stream(self) -> None:
        """Void what the stream staged, unless it is a sealed epoch that still has to be applied."""
        if self._sealed:
            self.journal.close()
        else:
            self.journal.drop()
        self._forget_held()
        self._staged_epoch = 0
        self._close_direct()

    def _close_direct(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def _check_epoch(self, epoch: int) -> None:
        if epoch <= self.state.last_applied:
            raise FrameError(
                ErrorCode.REPLAY,
                f"epoch {epoch} of volume {self.state.volume_id} is already applied "
                f"(last applied {self.state.last_applied})",
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
        if self._direct is not None:
            _write(self._direct, kind, offset, length, data)
            self.checksums.applied(kind, offset, length, data)
            return
        self.journal.append(kind, offset, length, epoch, data)
        if self._held is not None:
            self._held_bytes += len(data)
            if self._held_bytes > HOLD_BYTES:
                self._held = None
            else:
                self._held.append(Record(kind, offset, length, epoch, data))

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
        """Make the staged epoch durable, apply it, record it; blocking (run it in a thread)."""
        self._check_epoch(epoch)
        if self._direct is not None:
            self._direct.flush()
            self._close_direct()
            self._record(epoch)
        else:
            self.journal.commit(epoch)
            self._sealed = True
            self._apply(epoch, self._held)
            self._sealed = False
        self.journal.begin()
        self._forget_held()
        self._staged_epoch = 0

    def _apply(self, epoch: int, held: list[Record] | None = None) -> None:
        """Write the committed records (HELD, else read back from the journal) to the image."""
        records = read_records(self.journal.path) if held is None else held
        backend = Backend.open(self.image_path, self.state.size, read_only=False)
        try:
            for record in records:
                _write(backend, record.kind, record.offset, record.length, record.data)
                self.checksums.applied(record.kind, record.offset, record.length, record.data)
            backend.flush()
        finally:
            backend.close()
        self._record(epoch)

    def _record(self, epoch: int) -> None:
        self.checksums.committed(epoch)
        self.state.last_applied = epoch
        self.state.save(self.state_path)


def _write(
    backend: Backend, kind: Kind, offset: int, length: int, data: bytes | memoryview
) -> None:
    if kind is Kind.DATA:
        backend.pwrite(data, offset)
    elif kind is Kind.ZERO:
        backend.zero(offset, length, may_trim=False, fast_only=False)
    elif kind is Kind.TRIM:
        backend.zero(offset, length, may_trim=True, fast_only=False)
