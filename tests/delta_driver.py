"""Test-side helpers for the delta stream: shadow processes and a primary-side write driver.

The driver plays the NBD server's part: every write goes to a real volume file and to the
Replicator, and every cut records the sha256 of the file, so a shadow's image can be checked
against the exact state of the epoch its state file claims.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from collections.abc import Sequence
from pathlib import Path

from shadowblk.delta.journal import committed_epoch
from shadowblk.delta.replicator import Replicator
from tests.procs import SHADOWBLK, Processes

BLOCK = 4096


def make_key(path: Path) -> Path:
    path.write_text(os.urandom(32).hex())
    return path


def start_shadow(
    procs: Processes, data_dir: Path, key: Path, name: str, port: int = 0, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen, int]:
    """A `shadowblk shadow` process; returns it and the port it listens on."""
    proc = procs.start(
        [
            *SHADOWBLK,
            "shadow",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data_dir),
            "--hmac-key-file",
            str(key),
            *extra,
        ],
        name,
    )
    line = procs.wait_ready(proc)
    return proc, int(line.rsplit(":", 1)[1])


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def shadow_state(data_dir: Path, volume: str) -> dict:
    return json.loads((data_dir / f"{volume}.state").read_text())


def durable_epoch(data_dir: Path, volume: str) -> int:
    """The epoch a restart of the shadow would come back at: its state file's, or a later one
    committed in its journal (acknowledged from there before a checkpoint records it)."""
    journal = committed_epoch(data_dir / f"{volume}.journal") or 0
    return max(shadow_state(data_dir, volume)["last_applied"], journal)


class Driver:
    """A primary volume file written at random, with its Replicator."""

    def __init__(self, path: Path, size: int, seed: int) -> None:
        self.path = path
        self.size = size
        self.rng = random.Random(seed)
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(size)
        self.fd = os.open(path, os.O_RDWR)
        self.hashes: dict[int, str] = {0: file_hash(path)}
        self.rep: Replicator | None = None

    def attach(self, rep: Replicator) -> Replicator:
        self.rep = rep
        rep.start()
        return rep

    def prefill(self, count: int) -> None:
        """Data written before any replicator exists (only a full sync can ship it)."""
        for _ in range(count):
            offset = self.rng.randrange(0, self.size - 64 * BLOCK, BLOCK)
            os.pwrite(self.fd, self.rng.randbytes(self.rng.randint(1, 64) * BLOCK), offset)
        self.hashes = {0: file_hash(self.path)}

    def write_some(self, count: int) -> None:
        """COUNT random changes: mostly data (some unaligned), a few zero runs and trims."""
        assert self.rep is not None
        for _ in range(count):
            kind = self.rng.random()
            length = self.rng.randint(1, 16) * BLOCK
            offset = self.rng.randrange(0, self.size - length, BLOCK)
            if kind < 0.1:
                offset += self.rng.randrange(BLOCK)
                length = self.rng.randint(1, 3 * BLOCK)
            # as the NBD server does: the replicator first (it records the range durably),
            # then the volume, then (not modelled here) the acknowledgement
            if kind < 0.8:
                data = self.rng.randbytes(length // 2) * 2 + self.rng.randbytes(length % 2)
                self.rep.on_write(offset, data)
                os.pwrite(self.fd, data, offset)
            elif kind < 0.9:
                self.rep.on_zero(offset, length)
                os.pwrite(self.fd, bytes(length), offset)
            else:
                self.rep.on_trim(offset, length)
                os.pwrite(self.fd, bytes(length), offset)

    def cut(self) -> int:
        """Close the epoch and remember the volume's hash at that point."""
        assert self.rep is not None
        epoch = self.rep.cut_epoch()
        self.hashes[epoch] = file_hash(self.path)
        return epoch

    def expected_hash(self, epoch: int) -> str:
        """The hash of the state at EPOCH: an epoch the test did not cut (an empty one cut by
        the replicator to end a resync) has the state of the last cut before it."""
        return self.hashes[max(e for e in self.hashes if e <= epoch)]

    def close(self) -> None:
        if self.rep is not None:
            self.rep.close()
        os.close(self.fd)
