"""dm-era in a real guest kernel: its metadata, read on the host by era_invalidate and by ours."""

import itertools
import json

import numpy as np
import pytest

from shadowblk.tracking.dm_era import EraMetadata
from tests.kernel.era_invalidate import era_invalidate
from tests.kernel.lab_run import BIG, SMALL, EraCase, LabRun

CASES = [pytest.param(SMALL, id="64KiB-blocks"), pytest.param(BIG, id="4KiB-blocks-2GiB")]


def meta(lab: LabRun, case: EraCase):
    return lab.images["small_meta" if case is SMALL else "big_meta"]


def final_status(lab: LabRun, case: EraCase) -> list[str]:
    """`dmsetup status` after the last resume: start len era mbs used/total era snap-root."""
    rc, log = lab.part(case.name)
    assert rc == 0, log
    return (lab.result.outdir / case.name / "status").read_text().split()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_guest_ran_every_operation(lab: LabRun, case: EraCase) -> None:
    status = final_status(lab, case)
    assert status[2] == "era"
    assert int(status[5]) == case.final_era
    assert status[6] != "-"  # the snapshot is held


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_era_invalidate_lists_exactly_the_written_blocks(lab: LabRun, case: EraCase) -> None:
    for since in range(1, case.final_era + 2):
        assert era_invalidate(meta(lab, case), since, False) == case.expected(since, False), since


@pytest.mark.slow
def test_era_invalidate_on_the_snapshot(lab: LabRun) -> None:
    for since in range(1, SMALL.final_era + 2):
        want = SMALL.expected(since, snapshot=True)
        assert era_invalidate(meta(lab, SMALL), since, True) == want, since


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_reader_agrees_with_era_invalidate_on_live_metadata(lab: LabRun, case: EraCase) -> None:
    md = EraMetadata.open(meta(lab, case), snapshot=False)
    assert md.current_era == case.final_era
    for since in range(0, case.final_era + 2):
        assert set(md.written_since(since)) == era_invalidate(meta(lab, case), since, False)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_reader_reads_the_snapshot(lab: LabRun, case: EraCase) -> None:
    md = EraMetadata.open(meta(lab, case), snapshot=True)
    assert md.superblock.location == int(final_status(lab, case)[6])
    assert md.current_era == case.snapshot_era
    assert md.block_size == case.block_sectors * 512
    assert md.nr_blocks == case.origin_mib * 2**20 // md.block_size
    for since in range(0, case.final_era + 2):
        got = list(md.written_since(since))
        assert got == sorted(case.expected(since, snapshot=True)), since
        if case is SMALL:
            assert set(got) == era_invalidate(meta(lab, case), since, True)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_extents_and_bitmap_cover_exactly_the_written_blocks(lab: LabRun, case: EraCase) -> None:
    md = EraMetadata.open(meta(lab, case))
    size = md.nr_blocks * md.block_size
    extents = list(md.written_extents(1))
    covered = {o // md.block_size + i for o, n in extents for i in range(n // md.block_size)}
    assert covered == case.expected(1, snapshot=True)
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(extents))
    bitmap = md.dirty_bitmap(1, size)
    assert list(bitmap.extents()) == extents
    assert np.count_nonzero(md.written_mask(1)) == bitmap.count()


@pytest.mark.slow
def test_reader_in_the_guest_sees_a_new_snapshot_on_a_live_device(lab: LabRun) -> None:
    """tests/kernel/guest_era_live.py: eras 1 {3, 4}, checkpoint, read, era 2 {60}, snapshot."""
    rc, log = lab.part("era_live")
    assert rc == 0, log
    result = json.loads((lab.result.outdir / "era_live" / "result.json").read_text())
    assert result["live_era"] == 2 and result["live_since_1"] == [3, 4]
    assert result["snap_era"] == 3
    assert result["snap_since"] == {"1": [3, 4, 60], "2": [60], "3": []}
