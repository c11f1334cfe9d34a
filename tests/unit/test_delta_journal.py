"""The applier's staging: a crash at any step of a commit leaves the image at an epoch boundary."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from shadowblk.delta.applier import ShadowVolume
from shadowblk.delta.frames import ErrorCode, FrameError, Hello
from shadowblk.delta.journal import Journal, Kind, committed_epoch, read_records
from shadowblk.delta.volume_state import StateFileError
from shadowblk.nbd.backend import Backend

SIZE = 256 << 10
BS = 4096


def image_hash(volume: ShadowVolume) -> str:
    return hashlib.sha256(volume.image_path.read_bytes()).hexdigest()


def staged_volume(tmp_path: Path) -> tuple[ShadowVolume, str, bytes]:
    """A volume at epoch 1 with epoch 2 staged (two data records and a trim)."""
    volume = ShadowVolume.create(tmp_path, Hello("v", SIZE, BS, 1, 0, b"n" * 16))
    volume.begin_stream()
    volume.stage(Kind.DATA, 0, BS, 1, b"\x01" * BS)
    volume.commit(1)
    at_epoch_1 = image_hash(volume)
    new = os.urandom(2 * BS)
    volume.stage(Kind.DATA, BS, 2 * BS, 2, new)
    volume.stage(Kind.TRIM, 0, BS, 2)
    return volume, at_epoch_1, new


def damage(path: Path, at: int, data: bytes) -> None:
    """Overwrite bytes of PATH at AT, as a write that never (or only partly) reached the disk."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def reopen(tmp_path: Path) -> ShadowVolume:
    return ShadowVolume.load(tmp_path, tmp_path / "v.state")


def test_uncommitted_epoch_is_dropped(tmp_path: Path) -> None:
    volume, at_epoch_1, _ = staged_volume(tmp_path)
    volume.journal.close()  # crash: no COMMIT record
    again = reopen(tmp_path)
    assert again.state.last_applied == 1 and image_hash(again) == at_epoch_1
    assert committed_epoch(again.journal.path) is None


@pytest.mark.parametrize("applied_records", [0, 1, 2])
def test_committed_epoch_is_reapplied_after_a_crash_mid_apply(
    tmp_path: Path, applied_records: int
) -> None:
    volume, _, new = staged_volume(tmp_path)
    volume.journal.commit(2)  # durable; then the crash hits after some records reached the image
    backend = Backend.open(volume.image_path, SIZE, read_only=False)
    if applied_records >= 1:
        backend.pwrite(new, BS)
    if applied_records >= 2:
        backend.zero(0, BS, may_trim=True, fast_only=False)
    backend.close()
    again = reopen(tmp_path)
    assert again.state.last_applied == 2
    image = again.image_path.read_bytes()
    assert image[:BS] == bytes(BS) and image[BS : 3 * BS] == new
    assert committed_epoch(again.journal.path) is None


def test_torn_commit_record_is_not_a_commit(tmp_path: Path) -> None:
    volume, at_epoch_1, _ = staged_volume(tmp_path)
    volume.journal.commit(2)
    damage(volume.journal.path, volume.journal.end - 1, b"\xff")  # its last byte never landed
    again = reopen(tmp_path)
    assert again.state.last_applied == 1 and image_hash(again) == at_epoch_1


def test_journal_left_after_the_state_update_is_not_applied_twice(tmp_path: Path) -> None:
    volume, _, _ = staged_volume(tmp_path)
    volume.commit(2)
    volume.checkpoint()
    assert json.loads(volume.state_path.read_text())["last_applied"] == 2
    after = image_hash(volume)
    volume.end_stream()
    stale = Journal(volume.journal.path)  # as if the crash came before the journal was emptied
    stale.begin()
    stale.append(Kind.DATA, BS, 2 * BS, 2, bytes(2 * BS))
    stale.commit(2)
    stale.close()
    again = reopen(tmp_path)
    assert again.state.last_applied == 2 and image_hash(again) == after


def test_refusals(tmp_path: Path) -> None:
    volume, _, _ = staged_volume(tmp_path)
    with pytest.raises(FrameError) as err:
        volume.stage(Kind.DATA, 0, BS, 1, bytes(BS))
    assert err.value.code is ErrorCode.REPLAY
    with pytest.raises(FrameError) as err:
        volume.accept(Hello("v", 2 * SIZE, BS, 1, 0, b"n" * 16))
    assert err.value.code is ErrorCode.VOLUME_MISMATCH
    volume.accept(Hello("v", SIZE, BS, 4, 0, b"n" * 16))
    with pytest.raises(FrameError) as err:
        volume.accept(Hello("v", SIZE, BS, 3, 0, b"n" * 16))
    assert err.value.code is ErrorCode.STALE_GENERATION
    assert reopen(tmp_path).state.generation == 4


def test_first_epoch_of_a_new_volume_skips_the_journal(tmp_path: Path) -> None:
    """No epoch applied yet means no state to protect: the full sync is written once."""
    volume = ShadowVolume.create(tmp_path, Hello("v", SIZE, BS, 1, 0, b"n" * 16))
    volume.begin_stream()
    data = os.urandom(BS)
    volume.stage(Kind.DATA, 2 * BS, BS, 1, data)
    assert committed_epoch(volume.journal.path) is None
    assert not list(read_records(volume.journal.path))
    volume.end_stream()  # the stream breaks before EPOCH_END: the volume is still at epoch 0
    again = reopen(tmp_path)
    assert again.state.last_applied == 0
    again.begin_stream()
    again.stage(Kind.DATA, 2 * BS, BS, 1, data)
    again.commit(1)
    assert again.state.last_applied == 1
    assert again.image_path.read_bytes()[2 * BS : 3 * BS] == data
    again.stage(Kind.DATA, 0, BS, 2, data)  # the next epoch goes through the journal again
    again.commit(2)
    assert committed_epoch(again.journal.path) == 2


def test_a_commit_that_fails_half_way_is_finished_before_the_next_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume, _, new = staged_volume(tmp_path)
    real = Backend.zero

    def failing_zero(self: Backend, *args, **kw) -> bool:
        raise OSError(5, "injected EIO")

    monkeypatch.setattr(Backend, "zero", failing_zero)
    with pytest.raises(OSError):
        volume.commit(2)  # the data record reached the image, the trim did not
    volume.end_stream()  # the stream ends: the sealed journal must survive it
    assert committed_epoch(volume.journal.path) == 2
    monkeypatch.setattr(Backend, "zero", real)
    volume.begin_stream()
    assert volume.state.last_applied == 2
    image = volume.image_path.read_bytes()
    assert image[:BS] == bytes(BS) and image[BS : 3 * BS] == new


def test_acknowledged_epochs_live_in_the_journal_until_a_checkpoint(tmp_path: Path) -> None:
    """commit() returns (the epoch may be acknowledged) after one journal fdatasync: the state
    file still names the last checkpoint, and a crash before the next one loses nothing."""
    volume, _, new = staged_volume(tmp_path)
    volume.commit(2)
    later = os.urandom(BS)
    volume.stage(Kind.DATA, 3 * BS, BS, 3, later)
    volume.commit(3)
    assert volume.applied == 3
    assert json.loads(volume.state_path.read_text())["last_applied"] == 1
    at_epoch_3 = image_hash(volume)
    volume.stage(Kind.DATA, 0, BS, 4, os.urandom(BS))  # staged, never committed
    volume.journal.close()  # crash
    again = reopen(tmp_path)
    assert again.state.last_applied == again.applied == 3
    assert image_hash(again) == at_epoch_3
    image = again.image_path.read_bytes()
    assert image[:BS] == bytes(BS) and image[BS : 3 * BS] == new and image[3 * BS : 4 * BS] == later
    assert committed_epoch(again.journal.path) is None


def test_a_stream_end_checkpoints_and_voids_the_uncommitted_rest(tmp_path: Path) -> None:
    volume, _, _ = staged_volume(tmp_path)
    volume.commit(2)
    at_epoch_2 = image_hash(volume)
    volume.stage(Kind.DATA, 0, BS, 3, os.urandom(BS))
    volume.end_stream()
    assert json.loads(volume.state_path.read_text())["last_applied"] == 2
    assert committed_epoch(volume.journal.path) is None and image_hash(volume) == at_epoch_2
    volume.begin_stream()
    with pytest.raises(FrameError) as err:
        volume.stage(Kind.DATA, 0, BS, 2, bytes(BS))
    assert err.value.code is ErrorCode.REPLAY


def test_a_journal_of_the_older_format_is_not_silently_dropped(tmp_path: Path) -> None:
    """Its commits cannot be read here and may hold acknowledged epochs: an operator decides."""
    volume, _, _ = staged_volume(tmp_path)
    volume.end_stream()
    volume.journal.path.write_bytes(b"SBJR" + bytes(60))
    with pytest.raises(StateFileError, match="older format"):
        reopen(tmp_path)


def test_epochs_sealed_while_the_image_lags_recover_to_the_last_one(tmp_path: Path) -> None:
    """Epoch 3 is staged and sealed while epoch 2 still waits for its image writes (the image
    task lags the journal); a crash then recovers both, in order: epoch 3's write of block 1
    wins over epoch 2's."""
    volume, _, new = staged_volume(tmp_path)
    volume.seal(2)
    later = os.urandom(BS)
    volume.stage(Kind.DATA, BS, BS, 3, later)
    volume.seal(3)
    assert volume.pending() == 2 and volume.applied == 3
    volume.checkpoint()  # refused: the image does not hold the sealed epochs
    assert json.loads(volume.state_path.read_text())["last_applied"] == 1
    volume.journal.close()  # crash before any of their records reached the image
    again = reopen(tmp_path)
    assert again.state.last_applied == 3
    image = again.image_path.read_bytes()
    assert image[:BS] == bytes(BS) and image[BS : 2 * BS] == later
    assert image[2 * BS : 3 * BS] == new[BS:]


def test_end_of_stream_writes_pending_epochs_before_its_checkpoint(tmp_path: Path) -> None:
    volume, _, new = staged_volume(tmp_path)
    volume.seal(2)
    volume.stage(Kind.DATA, 3 * BS, BS, 3, b"\x03" * BS)  # staged, never sealed: void
    volume.end_stream()
    assert volume.pending() == 0
    assert json.loads(volume.state_path.read_text())["last_applied"] == 2
    image = volume.image_path.read_bytes()
    assert image[:BS] == bytes(BS) and image[BS : 3 * BS] == new
    assert image[3 * BS : 4 * BS] == bytes(BS)
    assert committed_epoch(volume.journal.path) is None
