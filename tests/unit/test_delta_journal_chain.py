"""The journal's record chain: after a crash or a power loss, reading finds exactly the epochs
whose commit write completed, whatever else the preallocated, reused file still holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shadowblk.delta.journal import (
    ALIGN,
    BUFFER,
    HEAD_SIZE,
    PREALLOC,
    Journal,
    Kind,
    committed_epoch,
    last_commit,
    read_records,
)

BS = 4096


def overwrite(path: Path, at: int, data: bytes) -> None:
    """What the disk holds at AT after a write that never (or only partly) landed."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def snapshot(path: Path) -> bytes:
    return path.read_bytes()


def epoch(journal: Journal, number: int, blocks: int) -> list[tuple[int, bytes]]:
    """Stage and commit BLOCKS data records of epoch NUMBER; their (record offset, data)."""
    staged = []
    for i in range(blocks):
        data = os.urandom(BS)
        staged.append((journal.end, data))
        journal.append(Kind.DATA, i * BS, BS, number, data)
    journal.commit(number)
    return staged


@pytest.fixture
def journal(tmp_path: Path):
    j = Journal(tmp_path / "v.journal")
    j.begin()
    yield j
    j.close()


def test_committed_epochs_read_back_in_order(journal: Journal) -> None:
    first = epoch(journal, 3, 2)
    second = epoch(journal, 4, 1)
    records = list(read_records(journal.path))
    assert [(r.kind, r.epoch) for r in records] == [
        (Kind.DATA, 3), (Kind.DATA, 3), (Kind.COMMIT, 3), (Kind.DATA, 4), (Kind.COMMIT, 4),
    ]  # fmt: skip
    assert [bytes(r.data) for r in records if r.kind is Kind.DATA] == [d for _, d in first + second]
    assert last_commit(journal.path) == (4, journal.end)
    assert journal.end % ALIGN == 0  # every commit ends on the direct-I/O unit
    assert journal.path.stat().st_size == PREALLOC  # written in place: the size never changes


def test_uncommitted_records_are_not_an_epoch(journal: Journal) -> None:
    epoch(journal, 1, 1)
    journal.append(Kind.DATA, 0, BS, 2, os.urandom(BS))
    journal.append(Kind.TRIM, BS, BS, 2)
    journal.close()  # crash before the commit: at most part of the staged records reached it
    assert committed_epoch(journal.path) == 1


@pytest.mark.parametrize("where", ["data", "head", "commit"])
def test_a_torn_write_loses_exactly_its_epoch(journal: Journal, where: str) -> None:
    epoch(journal, 1, 2)
    staged = epoch(journal, 2, 3)
    at = {
        "data": staged[1][0] + HEAD_SIZE + 100,
        "head": staged[2][0] + 30,
        "commit": journal.end - HEAD_SIZE - 1,
    }[where]
    overwrite(journal.path, at, b"\xff" * 8)
    assert committed_epoch(journal.path) == 1


def test_a_later_block_that_landed_after_a_lost_one_is_not_used(journal: Journal) -> None:
    """Power loss during a multi-block commit write: blocks land in any order. A lost record
    in the middle ends the chain even though the COMMIT after it is intact."""
    epoch(journal, 1, 1)
    before = snapshot(journal.path)
    staged = epoch(journal, 2, 4)
    lost = staged[1][0]
    overwrite(journal.path, lost, before[lost : lost + HEAD_SIZE + BS])  # the old bytes
    assert committed_epoch(journal.path) == 1


def test_a_new_round_never_continues_into_an_older_one(journal: Journal) -> None:
    """After a checkpoint the file is written again from its start; an older round's records
    further on, or under a first record that was lost, are not part of the new round."""
    epoch(journal, 1, 3)
    epoch(journal, 2, 3)
    old = snapshot(journal.path)
    journal.reset()
    assert committed_epoch(journal.path) is None  # the wiped first block
    journal.begin()
    staged = epoch(journal, 3, 1)
    assert last_commit(journal.path) == (3, journal.end)
    # the new round's first record lost, the old one's first block back: the old round reads
    # as far as it goes (epochs at or below the state's, never re-applied), never into epoch 3
    overwrite(journal.path, 0, old[:ALIGN])
    found = committed_epoch(journal.path)
    assert found is None or found <= 2
    assert all(r.epoch != 3 for r in read_records(journal.path))
    assert staged


def test_a_voided_tail_is_not_taken_for_the_records_that_replace_it(journal: Journal) -> None:
    """A stream drops mid-epoch after staged records were written out (a full buffer), and the
    next one stages from the last commit again. If the replacement's first record is lost at a
    power cut, the voided record under it does not let the replacement's commit be read."""
    epoch(journal, 1, 1)
    start = journal.end
    extent = os.urandom(1 << 20)
    for i in range(BUFFER // len(extent) + 1):
        journal.append(Kind.DATA, i << 20, len(extent), 2, extent)
    voided = snapshot(journal.path)  # the buffer's first BUFFER bytes are on disk
    assert voided[start : start + 4] == b"SBJ2"
    journal.begin()  # the stream ended: back to the commit of epoch 1
    assert journal.end == start
    epoch(journal, 2, 3)
    assert committed_epoch(journal.path) == 2
    overwrite(journal.path, start, voided[start : start + HEAD_SIZE + BS])
    assert committed_epoch(journal.path) == 1


def test_garbage_and_missing_files_hold_no_epoch(tmp_path: Path) -> None:
    path = tmp_path / "v.journal"
    assert committed_epoch(path) is None
    path.write_bytes(os.urandom(3 * ALIGN))
    assert committed_epoch(path) is None and not list(read_records(path))


def test_the_file_grows_in_place_past_its_preallocation(journal: Journal) -> None:
    big = os.urandom(1 << 20)
    count = PREALLOC // len(big) + 2
    for _ in range(count):
        journal.append(Kind.DATA, 0, len(big), 1, big)
    journal.commit(1)
    assert journal.path.stat().st_size == 2 * PREALLOC
    assert committed_epoch(journal.path) == 1
    assert sum(1 for r in read_records(journal.path) if r.kind is Kind.DATA) == count
