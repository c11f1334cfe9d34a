"""A seeded fault-injecting proxy between the primary and the shadow: dropped, delayed,
truncated and corrupted bytes in both directions. Nothing wrong is applied (each checkpoint the
image is exactly the state of its epoch) and the stream recovers by itself."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from shadowblk.delta.replicator import Replicator
from tests.delta_driver import Driver, file_hash, make_key, shadow_state, start_shadow
from tests.faultproxy import FaultProxy, Faults
from tests.procs import Processes

SIZE = 8 << 20


def test_faulty_network_never_applies_bad_bytes_and_recovers(
    tmp_path: Path, procs: Processes
) -> None:
    key = make_key(tmp_path / "key")
    data = tmp_path / "shadow"
    proc, port = start_shadow(procs, data, key, "shadow-0")
    driver = Driver(tmp_path / "primary.img", SIZE, seed=5)
    driver.prefill(20)
    with FaultProxy(port, seed=42) as proxy:
        rep = driver.attach(
            Replicator(
                "flaky",
                driver.fd,
                SIZE,
                [f"127.0.0.1:{proxy.port}"],
                tmp_path / "state",
                hmac_key=key.read_text().encode(),
                cut_interval=None,
            )
        )
        try:
            assert rep.drain(60), rep.status()  # the initial full sync, on a clean network
            proxy.faults = Faults(drop=0.02, delay=0.05, truncate=0.02, corrupt=0.15)
            for round_ in range(3):
                deadline = time.monotonic() + 4
                while time.monotonic() < deadline:
                    driver.write_some(8)
                    driver.cut()
                    time.sleep(0.05)
                # a checkpoint: stop the shadow cleanly, its image must be an exact epoch
                proxy.set_gate(False)
                procs.stop(proc, signal.SIGTERM)
                applied = shadow_state(data, "flaky")["last_applied"]
                assert file_hash(data / "flaky.img") == driver.expected_hash(applied), round_
                proc, _ = start_shadow(procs, data, key, f"shadow-{round_ + 1}", port=port)
                proxy.set_gate(True)
            counts = proxy.counts
            assert counts.corruptions > 0 and counts.drops + counts.truncations > 0, counts
            proxy.faults = Faults()
            assert rep.drain(90), rep.status()
            status = rep.status()["shadows"][0]
            assert status["reconnects"] > 0
        finally:
            driver.close()
    assert file_hash(data / "flaky.img") == file_hash(driver.path)
    logs = "".join((tmp_path / f"shadow-{i}.log").read_text() for i in range(4))
    # damaged frames were seen and refused (NACKed or the stream dropped), never applied
    assert "NACK seq" in logs or "header checksum mismatch" in logs


def test_back_pressure_bounds_the_lag_of_a_slow_shadow(tmp_path: Path, procs: Processes) -> None:
    key = make_key(tmp_path / "key")
    _, port = start_shadow(procs, tmp_path / "shadow", key, "shadow")
    driver = Driver(tmp_path / "primary.img", SIZE, seed=8)
    budget = 1 << 20
    with FaultProxy(port, seed=3, faults=Faults(delay=1.0, max_delay=0.03)) as proxy:
        rep = driver.attach(
            Replicator(
                "slow",
                driver.fd,
                SIZE,
                [f"127.0.0.1:{proxy.port}"],
                tmp_path / "state",
                hmac_key=key.read_text().encode(),
                cut_interval=None,
                max_lag_bytes=budget,
            )
        )
        try:
            assert rep.drain(60), rep.status()
            worst = 0
            for _ in range(60):
                driver.write_some(4)
                worst = max(worst, rep.status()["lag_bytes"])
            # the slow shadow did fall behind, and back-pressure held the lag at the budget
            assert budget // 2 < worst <= budget + 16 * 4096 * 4, worst
            assert proxy.counts.delays > 0
            assert rep.drain(60), rep.status()
        finally:
            driver.close()
    assert file_hash(tmp_path / "shadow" / "slow.img") == file_hash(driver.path)
