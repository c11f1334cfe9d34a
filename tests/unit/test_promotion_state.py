"""The promotion's file work moved out of the VM's pause stays safe: epoch numbers are handed out
only under a durable reservation, a journal is recovered only when it commits past the state,
and the replication state is made durable by `settle` after `go`."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest

from shadowblk.agent import switch
from shadowblk.delta import primary_state
from shadowblk.delta.applier import ShadowVolume
from shadowblk.delta.frames import Hello
from shadowblk.delta.journal import Kind
from shadowblk.delta.primary_state import EPOCH_RESERVATION, EpochCounter
from shadowblk.delta.server import ShadowServer
from shadowblk.delta.volume_state import VolumeState

SIZE = 256 << 10
BS = 4096


def reserved(state_dir: Path) -> int:
    return int(json.loads((state_dir / "replicator.json").read_text())["reserved"])


def test_no_epoch_number_is_handed_out_before_its_reservation_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start's reservation is written by a thread: `take` waits for it."""
    release, real = threading.Event(), primary_state.write_json

    def slow_write(path: Path, data: dict, durable: bool = True) -> None:
        release.wait(10)
        real(path, data, durable)

    monkeypatch.setattr(primary_state, "write_json", slow_write)
    counter = EpochCounter(tmp_path, "v1", SIZE, BS)  # returns at once: the write waits
    taken: list[int] = []
    taker = threading.Thread(target=lambda: taken.append(counter.take()))
    taker.start()
    taker.join(0.3)
    assert taker.is_alive() and not taken and not (tmp_path / "replicator.json").exists()
    release.set()
    taker.join(10)
    assert taken == [1] and reserved(tmp_path) == 1 + EPOCH_RESERVATION
    again = EpochCounter(tmp_path, "v1", SIZE, BS)  # a restart: past every number reserved
    assert again.take() == 1 + EPOCH_RESERVATION


def test_a_start_whose_reservation_failed_reserves_at_the_first_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = primary_state.write_json, []

    def failing_once(path: Path, data: dict, durable: bool = True) -> None:
        calls.append(data["reserved"])
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real(path, data, durable)

    monkeypatch.setattr(primary_state, "write_json", failing_once)
    counter = EpochCounter(tmp_path, "v1", SIZE, BS)
    assert counter.take() == 1 and reserved(tmp_path) == 1 + EPOCH_RESERVATION
    counter.skip_past(40)
    assert counter.take() == 41 and reserved(tmp_path) == 41 + EPOCH_RESERVATION


def shadow_with_journal(tmp_path: Path) -> ShadowVolume:
    """A shadow volume "v" at epoch 1 whose epoch 2 is committed in the journal, not yet
    checkpointed (the state says 1)."""
    volume = ShadowVolume.create(tmp_path, Hello("v", SIZE, BS, 1, 0, b"n" * 16))
    volume.begin_stream()
    volume.stage(Kind.DATA, 0, BS, 1, b"\x01" * BS)
    volume.commit(1)  # the first epoch goes to the image directly
    volume.stage(Kind.DATA, BS, BS, 2, b"\x02" * BS)
    volume.commit(2)
    return volume


def test_a_journal_committing_past_the_state_is_recovered(tmp_path: Path) -> None:
    volume = shadow_with_journal(tmp_path)
    volume.journal.close()
    with open(volume.image_path, "r+b") as image:  # the apply never reached the disk
        image.seek(BS)
        image.write(bytes(BS))
    switch.recover(tmp_path, "v")
    assert VolumeState.load(tmp_path / "v.state").last_applied == 2
    assert volume.image_path.read_bytes()[BS : 2 * BS] == b"\x02" * BS


def test_a_checkpointed_journal_is_left_alone_and_removed_by_settle(tmp_path: Path) -> None:
    """The hand-over checkpointed: recovery writes nothing (no direct write in the pause);
    `take_shadow(durable=False)` leaves the journal and the syncs to `settle`."""
    volume = shadow_with_journal(tmp_path)
    volume.end_stream()  # checkpoints: state at 2, journal emptied
    journal = tmp_path / "v.journal"
    os.utime(journal, ns=(10**9, 10**9))  # any write would set it to now
    before = os.stat(journal).st_mtime_ns, journal.read_bytes()
    switch.recover(tmp_path, "v")
    assert (os.stat(journal).st_mtime_ns, journal.read_bytes()) == before
    primaries = tmp_path / "primaries"
    primaries.mkdir()
    assert switch.take_shadow(tmp_path, primaries, "v", ["10.0.0.2:7700"], durable=False) == 2
    assert journal.exists() and not (tmp_path / "v.state").exists()
    switch.settle(tmp_path, primaries, "v")
    assert not journal.exists()
    assert reserved(primaries / "v.state" / "replication") == 3


def test_prime_answers_once_the_fed_volume_is_checkpointed(tmp_path: Path) -> None:
    """The switchover's `prime` before the pause: the shadow server answers when the stream
    feeding the volume checkpointed it (or at once if no stream feeds it: one that ended
    checkpointed), and says so if the wait ran out."""

    async def main() -> None:
        server = ShadowServer(tmp_path, b"k" * 32, None)
        assert await server.primed("v1", 0.05) == {"checkpointed": True}
        server.streams["v1"] = asyncio.get_running_loop().create_future()  # a stream feeds it
        server.prime("v1", 60)
        assert await server.primed("v1", 0.05) == {"checkpointed": False}
        waiter = asyncio.ensure_future(server.primed("v1", 5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        server.checkpointed("v1")  # what the stream calls once the image is durable
        assert await waiter == {"checkpointed": True}

    asyncio.run(main())
