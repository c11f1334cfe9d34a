"""kill -9 of the shadow at seeded random moments while it receives and applies epochs.

After every restart, before any sender may reconnect (the proxy's gate is closed), the image
must be exactly the volume at the epoch the state file names (I1), and that epoch must be at
least every epoch the primary saw acknowledged (an acknowledgement means durable).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from shadowblk.delta.journal import committed_epoch
from shadowblk.delta.replicator import Replicator
from tests.delta_driver import Driver, file_hash, make_key, shadow_state, start_shadow
from tests.faultproxy import FaultProxy
from tests.procs import Processes

SIZE = 8 << 20
ITERATIONS = 20


def test_kill9_of_the_shadow_leaves_an_acknowledged_epoch(tmp_path: Path, procs: Processes) -> None:
    rng = random.Random(20261127)
    key = make_key(tmp_path / "key")
    data = tmp_path / "shadow"
    proc, port = start_shadow(procs, data, key, "shadow-0")
    driver = Driver(tmp_path / "primary.img", SIZE, seed=3)
    driver.prefill(30)
    with FaultProxy(port, seed=1) as proxy:
        rep = driver.attach(
            Replicator(
                "crashvol",
                driver.fd,
                SIZE,
                [f"127.0.0.1:{proxy.port}"],
                tmp_path / "state",
                hmac_key=key.read_text().encode(),
                cut_interval=None,
            )
        )
        checked = 0
        try:
            driver.write_some(10)
            driver.cut()
            assert rep.drain(60), rep.status()  # past the full sync: every kill hits deltas
            for i in range(ITERATIONS):
                for _ in range(rng.randint(1, 3)):
                    driver.write_some(rng.randint(5, 20))
                    driver.cut()
                time.sleep(rng.uniform(0.0, 0.4))  # the kill lands anywhere in the stream
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                proxy.set_gate(False)
                acked = rep.status()["shadows"][0]["acked_epoch"]
                proc, _ = start_shadow(procs, data, key, f"shadow-{i + 1}", port=port)
                state = shadow_state(data, "crashvol")
                assert state["last_applied"] >= acked, "an acknowledged epoch was lost"
                if state["last_applied"]:
                    expected = driver.expected_hash(state["last_applied"])
                    assert file_hash(data / "crashvol.img") == expected, (
                        f"iteration {i}: image is not the state of epoch {state['last_applied']}"
                    )
                    checked += 1
                assert committed_epoch(data / "crashvol.journal") is None  # recovered, emptied
                proxy.set_gate(True)
            assert checked == ITERATIONS
            driver.write_some(20)
            driver.cut()
            assert rep.drain(60), rep.status()
        finally:
            driver.close()
    assert file_hash(data / "crashvol.img") == file_hash(driver.path)
