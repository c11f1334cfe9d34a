"""The switchover's small parts on real files and sockets: the serve's fence and lease, the
role change of a volume's files on one server, and attach's unflushed-write log."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from shadowblk.agent import switch
from shadowblk.attach.replay import needed
from shadowblk.attach.unflushed import Unflushed
from shadowblk.delta.primary_state import ShadowRecord
from shadowblk.delta.volume_state import VolumeState
from shadowblk.nbd import fence
from shadowblk.nbd import protocol as P
from shadowblk.tracking.bitmap import DirtyBitmap
from shadowblk.tracking.tracker import WriteTracker

SIZE, BS = 1 << 20, 4096


def refused(f: fence.Fence) -> bool:
    try:
        f.on_write(0, b"x")
    except OSError as err:
        assert err.errno == errno.ESHUTDOWN
        return True
    return False


def test_a_lease_fences_until_renewed_and_a_fence_is_for_good() -> None:
    f = fence.Fence(lease_s=0.0)
    assert refused(f)  # no lease yet: a `serve` started before a heartbeat refuses writes
    f.renew(3600)
    assert not refused(f)
    f.fence(drain_s=0)
    assert refused(f)
    f.renew(3600)
    assert refused(f) and f.status()["for_good"]
    with pytest.raises(OSError):
        f.on_flush()


def test_the_control_socket(tmp_path: Path) -> None:
    f = fence.Fence(lease_s=None)
    control = fence.ControlSocket(tmp_path / "ctl", f)
    try:
        assert fence.command(tmp_path / "ctl", {"op": "status"})["fenced"] is False
        assert fence.command(tmp_path / "ctl", {"op": "lease", "seconds": 0})["fenced"]
        bad = fence.command(tmp_path / "ctl", {"op": "lease"})
        assert not bad["ok"] and "bad command" in bad["error"]
        assert not fence.command(tmp_path / "ctl", {"op": "nope"})["ok"]
        # no replication here: a new shadow list is refused (the agent restarts such a serve)
        assert not fence.command(tmp_path / "ctl", {"op": "shadows", "shadows": []})["ok"]
        answer = fence.command(tmp_path / "ctl", {"op": "fence", "drain": 0})
        assert answer["fenced"] and answer["drained"] and answer["epoch"] == 0
        assert not control.go.is_set()
        fence.command(tmp_path / "ctl", {"op": "go"})
        assert control.go.is_set()
    finally:
        control.close()


def shadow(tmp_path: Path, epoch: int) -> tuple[Path, Path]:
    shadows, primaries = tmp_path / "shadows", tmp_path / "primaries"
    shadows.mkdir()
    primaries.mkdir()
    (shadows / "v1.img").write_bytes(b"\x5a" * SIZE)
    VolumeState("v1", SIZE, BS, 4, epoch).save(shadows / "v1.state")
    return shadows, primaries


def test_a_promoted_shadow_claims_its_epoch_for_every_shadow(tmp_path: Path) -> None:
    shadows, primaries = shadow(tmp_path, 17)
    assert switch.take_shadow(shadows, primaries, "v1", ["10.0.0.2:7700", "[::1]:7701"]) == 17
    assert (primaries / "v1.img").read_bytes() == b"\x5a" * SIZE
    assert not (shadows / "v1.img").exists() and not (shadows / "v1.state").exists()
    rep = primaries / "v1.state" / "replication"
    assert json.loads((rep / "replicator.json").read_text())["reserved"] == 18
    for name in ("10.0.0.2-7700", "__1-7701"):
        assert json.loads((rep / f"shadow-{name}.json").read_text()) == {"acked": 17}
        assert DirtyBitmap.load(rep / f"shadow-{name}.lacks").count() == 0


def test_a_standby_s_tracking_state_is_kept_and_the_rest_made_afresh(tmp_path: Path) -> None:
    """The standby `serve` opened its tracking state before `go` (its syncs out of the pause):
    the promotion keeps those files and nothing else of the folder; the shadows' records it
    writes without sync are what the replicator reads (acked 17, an activity log, no lacks)."""
    shadows, primaries = shadow(tmp_path, 17)
    state = primaries / "v1.state"
    tracker = WriteTracker(state, SIZE, BS)  # as `serve --standby` does before waiting
    tracked = sorted(p.name for p in state.iterdir())
    (state / "status.json").write_text("{}")  # left by some earlier primary
    (state / "replication").mkdir()
    (state / "replication" / "shadow-10.0.0.9-1.json").write_text('{"acked": 3}')
    switch.take_shadow(shadows, primaries, "v1", ["10.0.0.2:7700"], keep_tracking=True)
    assert sorted(p.name for p in state.iterdir()) == sorted([*tracked, "replication"])
    rep = state / "replication"
    assert sorted(p.name for p in rep.iterdir()) == [
        "replicator.json", "shadow-10.0.0.2-7700.al", "shadow-10.0.0.2-7700.json",
        "shadow-10.0.0.2-7700.lacks",
    ]  # fmt: skip
    record = ShadowRecord(rep, "10.0.0.2-7700", SIZE, BS)
    assert record.acked == 17 and record.lacks.count() == 0 and not record.log.hot
    tracker.close()
    WriteTracker(state, SIZE, BS).close()  # the `serve` after `go` goes on with it


def test_a_shadow_that_never_applied_an_epoch_is_not_promoted(tmp_path: Path) -> None:
    shadows, primaries = shadow(tmp_path, 0)
    with pytest.raises(switch.SwitchError, match="never applied"):
        switch.take_shadow(shadows, primaries, "v1", [])
    assert (shadows / "v1.img").exists()


def demoted(tmp_path: Path, lacks: int) -> tuple[str, Path]:
    """An old primary whose record of the new primary's shadow says: acked 9, LACKS blocks."""
    shadows, primaries = shadow(tmp_path, 9)
    switch.take_shadow(shadows, primaries, "v1", ["10.0.0.2:7700"])
    record = DirtyBitmap(SIZE, BS)
    if lacks:
        record.mark(0, lacks * BS)
    rep = primaries / "v1.state" / "replication"
    record.save(rep / "shadow-10.0.0.2-7700.lacks")
    shadows.mkdir(exist_ok=True)
    return switch.give_back(primaries, shadows, "v1", "10.0.0.2:7700", 5), shadows


def test_an_old_primary_that_shipped_everything_is_resynced(tmp_path: Path) -> None:
    mode, shadows = demoted(tmp_path, 0)
    assert mode == "resync"
    assert switch.shadow_epoch(shadows, "v1") == (5, 9)
    assert (shadows / "v1.img").read_bytes() == b"\x5a" * SIZE
    assert not (tmp_path / "primaries" / "v1.img").exists()


def test_an_old_primary_with_unshipped_writes_is_dropped(tmp_path: Path) -> None:
    mode, shadows = demoted(tmp_path, 2)
    assert mode == "full-sync"
    assert switch.shadow_epoch(shadows, "v1") is None
    assert not (shadows / "v1.img").exists()
    assert not (tmp_path / "primaries" / "v1.img").exists()


def test_unflushed_writes_are_kept_until_a_later_flush_completes() -> None:
    log = Unflushed(limit=1 << 20)
    log.completed(P.CMD_WRITE, 0, 0, 4, b"aaaa")
    mark = log.flush_sent()
    log.completed(P.CMD_TRIM, 0, 8, 4, b"")  # completed after the FLUSH was sent
    log.flush_done(mark)
    assert [(w.cmd, w.offset) for w in log.writes] == [(P.CMD_TRIM, 8)]
    log.completed(P.CMD_WRITE, 0, 0, 1 << 20, bytes(1 << 20))  # over the limit: dropped
    assert log.writes == [] and log.overflowed_at
    log.flush_done(log.flush_sent())
    assert not log.overflowed_at


def test_the_replay_skips_only_writes_wholly_overwritten_later() -> None:
    log = Unflushed()
    for offset, length in ((0, 4096), (8192, 4096), (4096, 4096), (0, 4096), (16384, 512),
                           (6000, 4096), (16384, 4096), (8192, 2048)):  # fmt: skip
        log.completed(P.CMD_WRITE, 0, offset, length, bytes(length))
    kept = [(w.offset, w.length) for w in needed(log.writes)]
    # 0 is written again whole; 16384's 512 bytes are under a whole later block; 4096 is only
    # partly under the write at 6000, 8192 only partly under the 2048 bytes at 8192
    assert kept == [(8192, 4096), (4096, 4096), (0, 4096), (6000, 4096), (16384, 4096),
                    (8192, 2048)]  # fmt: skip
