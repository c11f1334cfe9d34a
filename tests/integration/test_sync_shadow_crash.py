"""kill -9 of the shadow right after a sync-mode FLUSH was answered (I2).

A sync FLUSH returns only once every in-sync shadow acknowledged the epoch holding every write
before it; the shadow acknowledges a small epoch on its receiving path as soon as its journal
COMMIT is durable. So a kill -9 landing right after the FLUSH returned must find that epoch
after the restart (replayed from the journal if no checkpoint recorded it yet), with the image
exactly the volume's state at the epoch the state file names (I1), before any sender may
reconnect (the proxy's gate is closed).
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

from shadowblk.delta.journal import committed_epoch
from shadowblk.delta.replicator import Replicator
from tests.delta_driver import BLOCK, Driver, file_hash, make_key, shadow_state, start_shadow
from tests.faultproxy import FaultProxy
from tests.procs import Processes

SIZE = 8 << 20
ITERATIONS = 20


def _flushed_write(driver: Driver, rep: Replicator, rng: random.Random) -> int:
    """One data write (one capture: an epoch holds it whole), then a FLUSH; the epoch the FLUSH
    waited for (the caller records the volume's hash for it before the next write)."""
    length = rng.randint(1, 8) * BLOCK
    offset = rng.randrange(0, SIZE - length, BLOCK)
    data = rng.randbytes(length)
    rep.on_write(offset, data)  # as the NBD server does: the replicator first, then the volume
    os.pwrite(driver.fd, data, offset)
    return rep.flush(timeout=60)


def test_kill9_after_a_sync_flush_keeps_the_flushed_epoch(tmp_path: Path, procs: Processes) -> None:
    rng = random.Random(20261128)
    key = make_key(tmp_path / "key")
    data = tmp_path / "shadow"
    proc, port = start_shadow(procs, data, key, "shadow-0")
    driver = Driver(tmp_path / "primary.img", SIZE, seed=5)
    driver.prefill(20)
    with FaultProxy(port, seed=2) as proxy:
        rep = driver.attach(
            Replicator(
                "syncvol",
                driver.fd,
                SIZE,
                [f"127.0.0.1:{proxy.port}"],
                tmp_path / "state",
                mode="sync",
                hmac_key=key.read_text().encode(),
                cut_interval=None,
            )
        )
        try:
            for i in range(ITERATIONS):
                assert rep.drain(60), rep.status()  # in sync: the FLUSHes below wait for it
                for _ in range(rng.randint(0, 3)):
                    epoch = _flushed_write(driver, rep, rng)
                    driver.hashes[epoch] = file_hash(driver.path)
                flushed = _flushed_write(driver, rep, rng)
                os.kill(proc.pid, signal.SIGKILL)  # at once: the hash and checks come after
                proc.wait()
                driver.hashes[flushed] = file_hash(driver.path)  # no write since the FLUSH
                # the FLUSH really waited for this shadow (it was in sync)
                assert rep.status()["shadows"][0]["acked_epoch"] >= flushed, rep.status()
                proxy.set_gate(False)
                proc, _ = start_shadow(procs, data, key, f"shadow-{i + 1}", port=port)
                state = shadow_state(data, "syncvol")
                assert state["last_applied"] >= flushed, (
                    f"iteration {i}: epoch {flushed} was acknowledged to a FLUSH and is lost "
                    f"(the shadow restarted at {state['last_applied']})"
                )
                assert file_hash(data / "syncvol.img") == driver.expected_hash(
                    state["last_applied"]
                ), f"iteration {i}: image is not the state of epoch {state['last_applied']}"
                assert committed_epoch(data / "syncvol.journal") is None  # recovered, emptied
                proxy.set_gate(True)
            assert rep.drain(60), rep.status()
        finally:
            driver.close()
    assert file_hash(data / "syncvol.img") == file_hash(driver.path)
