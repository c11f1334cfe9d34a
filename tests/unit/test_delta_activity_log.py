"""The primary's activity log: a chunk is durable in it before a write into it is captured, a
busy chunk costs one append however often it is written, and a restart (clean or not) counts
every hot chunk as lacking."""

from __future__ import annotations

from pathlib import Path

from shadowblk.delta.primary_state import CHUNK, ActivityLog, ShadowRecord

SIZE = 64 * CHUNK
BS = 4096


def test_hot_chunks_survive_a_crash_and_count_as_lacking(tmp_path: Path) -> None:
    rec = ShadowRecord(tmp_path, "peer-1", SIZE, BS)
    rec.save(rec.persisted.copy(), 5)  # a shadow that acknowledged epoch 5, lacking nothing
    assert rec.heat(3 * CHUNK + BS, BS) == [3]
    rec.log.add([3])
    assert rec.heat(3 * CHUNK, 2 * BS) == []  # hot already: no append on the write path
    assert rec.heat(40 * CHUNK - BS, 2 * BS) == [39, 40]
    rec.log.add([39, 40])
    rec.log.close()  # kill -9: no checkpoint, no final save
    again = ShadowRecord(tmp_path, "peer-1", SIZE, BS)
    assert again.acked == 5
    assert list(again.lacks.extents()) == [(3 * CHUNK, CHUNK), (39 * CHUNK, 2 * CHUNK)]


def test_a_sequential_writer_heats_chunks_ahead(tmp_path: Path) -> None:
    rec = ShadowRecord(tmp_path, "peer-1", SIZE, BS)
    assert rec.heat(0, BS) == [0]
    assert rec.heat(CHUNK, BS) == list(range(1, 17))  # follows a hot chunk: 15 more with it
    assert rec.heat(62 * CHUNK, BS) == [62]
    assert rec.heat(63 * CHUNK, BS) == [63]  # never beyond the volume


def test_a_torn_append_keeps_what_came_before(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "x.al")
    log.hot.update([1, 2])
    log.add([1, 2])
    log.close()
    with open(log.path, "ab") as f:
        f.write(b"\x07\x00\x00\x00\xff")  # an append cut short by the crash
    assert ActivityLog(log.path).hot == {1, 2}
    log.rewrite([9])
    assert ActivityLog(log.path).hot == {9}
