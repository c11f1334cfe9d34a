"""One volume handed over by a running shadow server (a promotion), the others streaming on.

Through the shadow server's control socket: `release` leaves the volume's files checkpointed
(state file at the last applied epoch, image exactly that epoch, journal empty) and refuses its
streams while held, without a restart and without disturbing another volume's stream; `adopt`
takes it back, and its sender catches up.
"""

from __future__ import annotations

from pathlib import Path

from shadowblk.delta.journal import committed_epoch
from shadowblk.delta.replicator import Replicator
from shadowblk.nbd import fence
from tests.delta_driver import (
    Driver,
    durable_epoch,
    file_hash,
    make_key,
    shadow_state,
    start_shadow,
)
from tests.procs import Processes

SIZE = 4 << 20


def _replicate(driver: Driver, name: str, port: int, key: Path, state: Path) -> Replicator:
    return driver.attach(
        Replicator(
            name,
            driver.fd,
            SIZE,
            [f"127.0.0.1:{port}"],
            state,
            hmac_key=key.read_text().encode(),
            cut_interval=None,
        )
    )


def _epoch(driver: Driver) -> int:
    driver.write_some(10)
    epoch = driver.cut()
    assert driver.rep is not None and driver.rep.drain(60), driver.rep and driver.rep.status()
    return epoch


def test_release_and_adopt_one_volume_while_another_streams(
    tmp_path: Path, procs: Processes
) -> None:
    key, data, ctl = make_key(tmp_path / "key"), tmp_path / "shadow", tmp_path / "shadow.ctl"
    proc, port = start_shadow(procs, data, key, "shadow", extra=["--control-socket", str(ctl)])
    keep = Driver(tmp_path / "keep.img", SIZE, seed=1)
    moving = Driver(tmp_path / "moving.img", SIZE, seed=2)
    try:
        _replicate(keep, "keep", port, key, tmp_path / "keep.state")
        _replicate(moving, "moving", port, key, tmp_path / "moving.state")
        _epoch(keep)
        _epoch(moving)
        assert fence.command(ctl, {"op": "prime", "volume": "moving", "seconds": 30})["ok"]
        last = _epoch(moving)  # committed after the prime: the release checkpoints it

        answer = fence.command(ctl, {"op": "release", "volume": "moving", "seconds": 30})
        assert answer == {"ok": True, "epoch": last}
        assert shadow_state(data, "moving")["last_applied"] == last
        assert committed_epoch(data / "moving.journal") is None
        assert file_hash(data / "moving.img") == moving.expected_hash(last)
        status = fence.command(ctl, {"op": "status"})
        assert status["volumes"] == ["keep"] and status["held"] == ["moving"]

        _epoch(keep)  # the other volume's stream goes on, the server was not restarted
        _epoch(keep)
        assert proc.poll() is None

        moving.write_some(5)  # held: refused, nothing reaches the released files
        moving.cut()
        assert moving.rep is not None and not moving.rep.drain(1.5)
        assert "changing role" in moving.rep.status()["shadows"][0]["last_error"]
        assert shadow_state(data, "moving")["last_applied"] == last

        answer = fence.command(ctl, {"op": "adopt", "volume": "moving"})
        assert answer == {"ok": True, "epoch": last}
        final = _epoch(moving)  # its sender reconnects and catches up
        assert final > last and durable_epoch(data, "moving") == final  # applied since adopt
        assert fence.command(ctl, {"op": "status"})["held"] == []
        assert fence.command(ctl, {"op": "release", "volume": "../x", "seconds": 1})["ok"] is False
    finally:
        keep.close()
        moving.close()
    procs.stop_all()  # a clean stop checkpoints: the images are exactly the primaries'
    assert file_hash(data / "moving.img") == file_hash(moving.path)
    assert file_hash(data / "keep.img") == file_hash(keep.path)
