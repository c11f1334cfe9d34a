"""`shadowblk track --dm-era` in a real guest kernel: the blocks it reads from the era metadata
are the ones written (and what era_invalidate lists), and the shadow it ships to ends
byte-identical to the origin."""

import hashlib
import json

import pytest

from shadowblk.tracking.dm_era import EraMetadata
from tests.kernel.era_invalidate import era_invalidate
from tests.kernel.lab_run import LabRun

KNOWN = {0, 5, 100, 7, 511}  # written in the created era and the one after (track.sh)


def _part(lab: LabRun) -> dict:
    rc, log = lab.part("track")
    assert rc == 0, log
    out = lab.result.outdir / "track"
    return {
        "created": json.loads((out / "created.json").read_text()),
        "since": json.loads((out / "ship.json").read_text().splitlines()[0]),
        "ship": json.loads((out / "ship.json").read_text().splitlines()[-1]),
    }


@pytest.mark.slow
def test_written_since_lists_exactly_the_written_blocks(lab: LabRun) -> None:
    part = _part(lab)
    created = part["created"]
    assert created["current_era"] == created["era"] == 2  # era 1 at the first resume, then +1
    since = part["since"]
    assert since["block_size"] == 65536 and since["blocks"] == sorted(KNOWN)
    assert since["era"] == created["era"] + 2  # one checkpoint, then the snapshot's own era
    covered = {o // 65536 + i for o, n in since["extents"] for i in range(n // 65536)}
    assert covered == KNOWN


@pytest.mark.slow
def test_reader_agrees_with_era_invalidate_after_shipping(lab: LabRun) -> None:
    _part(lab)
    meta = lab.images["track_meta"]
    md = EraMetadata.open(meta, snapshot=False)  # the target was removed: the live view holds
    for since in range(1, md.current_era + 2):
        assert set(md.written_since(since)) == era_invalidate(meta, since, False), since
    assert set(md.written_since(2)) >= KNOWN


@pytest.mark.slow
def test_shadow_ends_byte_identical_to_the_origin(lab: LabRun) -> None:
    ship = _part(lab)["ship"]
    print(json.dumps({k: v for k, v in ship.items() if k != "replication"}))
    assert ship["drained"] and ship["state"] == "in-sync"
    assert ship["suspended_passes"] >= 2 and ship["passes"] > ship["suspended_passes"]
    assert lab.shadow_dir is not None
    shadow = (lab.shadow_dir / "vol.img").read_bytes()
    origin = lab.images["track_origin"].read_bytes()
    assert len(shadow) == len(origin)
    assert hashlib.sha256(shadow).digest() == hashlib.sha256(origin).digest()
    assert origin.count(0) < len(origin)  # the writes landed
