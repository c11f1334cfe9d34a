"""The dm-era reader on images a real kernel wrote: the blocks era_invalidate lists, no more."""

from pathlib import Path

import pytest

from shadowblk.tracking.dm_era import EraMetadata
from tests.kernel.era_invalidate import era_invalidate
from tests.unit.dm_era_images import unpack


@pytest.fixture(params=["small", "big"])
def image(request: pytest.FixtureRequest, tmp_path: Path):
    return unpack(request.param, tmp_path)


def test_snapshot_lists_the_blocks_written_before_it(image) -> None:
    path, case = image
    md = EraMetadata.open(path, snapshot=True)
    assert md.current_era == case.snapshot_era
    assert md.block_size == case.block_sectors * 512
    for since in range(0, case.final_era + 2):
        assert list(md.written_since(since)) == sorted(case.expected(since, snapshot=True))


def test_live_view_agrees_with_era_invalidate(image) -> None:
    path, case = image
    md = EraMetadata.open(path, snapshot=False)
    assert md.current_era == case.final_era
    for since in (1, 2, case.snapshot_era, case.final_era):
        got = set(md.written_since(since))
        assert got == case.expected(since, snapshot=False)
        assert got == era_invalidate(path, since, snapshot=False)


def test_extents_are_merged_byte_runs(tmp_path: Path) -> None:
    path, case = unpack("big", tmp_path)
    md = EraMetadata.open(path)
    # era 3 wrote blocks 0 and 4096..4100 (see lab_run.BIG)
    assert list(md.written_extents(3)) == [(0, 4096), (4096 * 4096, 5 * 4096)]
    assert list(md.written_extents(3, size=4096 * 4098)) == [(0, 4096), (4096 * 4096, 2 * 4096)]
    bitmap = md.dirty_bitmap(2, md.nr_blocks * md.block_size)
    assert bitmap.count() == len(case.expected(2, snapshot=True))


def test_reading_is_fast_enough_for_a_large_origin(tmp_path: Path) -> None:
    """524288 blocks (2 GiB at 4 KiB): the whole era array and writesets, parsed with numpy."""
    path, _ = unpack("big", tmp_path)
    md = EraMetadata.open(path)
    assert md.nr_blocks == 524288
    assert len(md.eras) == 524288
