"""A frame that fails to build (memory, a compressor error) costs a reconnect, never data: the
epoch is made again and ships whole, and the link keeps going (it used to ship the epoch
without its data, or stop for good)."""

from __future__ import annotations

from pathlib import Path

import pytest

import shadowblk.delta.epoch as epoch_module
from tests.delta_driver import Driver, make_key, start_shadow
from tests.integration.test_shadow_replication import SIZE, cmp, replicator
from tests.procs import Processes


def test_a_failed_frame_build_is_retried_and_the_shadow_converges(
    tmp_path: Path, procs: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = make_key(tmp_path / "key")
    _, port = start_shadow(procs, tmp_path / "s0", key, "shadow0")
    driver = Driver(tmp_path / "primary.img", SIZE, seed=11)
    rep = driver.attach(replicator(driver, [port], tmp_path / "state", key, mode="async"))
    real, failures = epoch_module.piece_changes, []

    def fail_once(*args):
        if not failures:
            failures.append(1)
            raise MemoryError("a transient failure while making a frame")
        return real(*args)

    try:
        assert rep.drain(60), rep.status()
        monkeypatch.setattr(epoch_module, "piece_changes", fail_once)
        driver.write_some(120)  # a few MiB: several frames, made on the compressor threads
        driver.cut()
        driver.write_some(20)
        driver.cut()
        assert rep.drain(60), rep.status()
        assert failures, "the failure was never injected"
        [shadow] = rep.status()["shadows"]
        assert shadow["reconnects"] >= 1 and "MemoryError" in (shadow["last_error"] or "")
    finally:
        driver.close()
    cmp(driver.path, tmp_path / "s0" / "vol1.img")
