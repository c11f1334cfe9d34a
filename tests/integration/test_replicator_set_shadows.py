"""A running Replicator takes a new shadow list without a restart (Replicator.set_shadows, what
`serve`'s control socket `shadows` runs when the manager replaces a lost shadow): the new shadow
gets a full sync then the stream, while writes go on; the dropped one gets nothing more."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.delta_driver import Driver, durable_epoch, make_key, start_shadow
from tests.integration.test_shadow_replication import SIZE, cmp, replicator
from tests.procs import Processes


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_shadow_added_and_one_dropped_while_writing(
    tmp_path: Path, procs: Processes, mode: str
) -> None:
    key = make_key(tmp_path / "key")
    _, old_port = start_shadow(procs, tmp_path / "s0", key, "shadow0")
    driver = Driver(tmp_path / "primary.img", SIZE, seed=5)
    rep = driver.attach(replicator(driver, [old_port], tmp_path / "state", key, mode=mode))
    try:
        driver.write_some(50)
        driver.cut()
        assert rep.drain(60), rep.status()

        _, new_port = start_shadow(procs, tmp_path / "s1", key, "shadow1")
        driver.write_some(20)  # captured before the change, shipped to the new shadow after
        [old] = rep.links
        added = rep.set_shadows([f"127.0.0.1:{new_port}"])
        rep._save(old, [0], True)  # a save and a checkpoint that were under way at the drop
        rep._checkpoint(old)
        assert added == [f"127.0.0.1:{new_port}"]
        assert rep.set_shadows([f"127.0.0.1:{new_port}"]) == []  # already shipped to
        for _ in range(5):
            driver.write_some(20)
            if mode == "sync":
                rep.flush(timeout=30)
            else:
                driver.cut()
        assert rep.drain(60), rep.status()
        status = rep.status()
        assert [s["address"] for s in status["shadows"]] == [f"127.0.0.1:{new_port}"]
        assert status["shadows"][0]["in_sync"] and status["shadows"][0]["catch_up"] == "full-sync"
    finally:
        driver.close()
    cmp(driver.path, tmp_path / "s1" / "vol1.img")  # every write, before and after the change
    assert durable_epoch(tmp_path / "s1", "vol1") >= status["last_cut_epoch"]
    assert durable_epoch(tmp_path / "s0", "vol1") < status["last_cut_epoch"]  # dropped
    # its record is gone: were it added again, it would get a full sync, not a stale resync
    assert not (tmp_path / "state" / f"shadow-127.0.0.1-{old_port}.json").exists()
