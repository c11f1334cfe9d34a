"""The replicator's checkpoint of what a shadow lacks: an acknowledgement that arrives while a
checkpoint is being saved is saved by the next one (else the record stays an epoch behind
for as long as the volume is quiet, and `shadowblk verify` sees blocks forever in flight)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from shadowblk.delta import replicator as replicator_module
from shadowblk.delta.replicator import Replicator
from shadowblk.delta.shipper import ShadowLink

BS = 4096
SIZE = 64 * BS


def test_an_ack_during_a_checkpoint_is_saved_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = tmp_path / "v.img"
    volume.write_bytes(bytes(SIZE))
    fd = os.open(volume, os.O_RDONLY)
    rep = Replicator(
        "v", fd, SIZE, ["127.0.0.1:9"], tmp_path / "state", hmac_key=b"k" * 16, cut_interval=None
    )
    (link,) = rep.links
    saves: list[int] = []
    checkpoint = rep._checkpoint

    def acked_meanwhile(link: ShadowLink, final: bool = False) -> int:
        saved = checkpoint(link, final)
        saves.append(saved)
        if len(saves) == 1:
            link.record.acked += 1  # the shadow's ack, read by the loop during the save
        if len(saves) == 2:
            rep.closing = True
        return saved

    monkeypatch.setattr(rep, "_checkpoint", acked_meanwhile)
    monkeypatch.setattr(replicator_module, "CHECKPOINT_INTERVAL", 0.01)
    try:
        link.record.acked = 5
        asyncio.run(asyncio.wait_for(rep._housekeeping(), 10))
        assert saves == [5, 6]
    finally:
        rep.closing = False
        monkeypatch.undo()
        rep.close()
        os.close(fd)
