"""The shadow stream's image task takes one sealed epoch per queue entry, in step with the
volume's pending epochs (the first epoch of a new volume, written straight to the image,
included): else each entry's "small" flag decided where the NEXT epoch was written, and a
big epoch could be written on the event loop, stalling every other stream."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from shadowblk.delta import server as srv
from shadowblk.delta.applier import ShadowVolume
from shadowblk.delta.frames import NONCE_SIZE, Frame, FrameType, Hello
from shadowblk.delta.journal import Kind

BS = 4096


async def _stream(
    folder: Path, size: int
) -> tuple[srv._Stream, ShadowVolume, asyncio.StreamWriter, socket.socket]:
    """A shadow stream on one end of a socket pair, with a new volume of SIZE bytes; the
    caller closes the writer and the other end."""
    server = srv.ShadowServer(folder, b"k" * 16, None)
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    stream = srv._Stream(server, reader, writer, "peer")
    volume = ShadowVolume.create(folder, Hello("v1", size, BS, 1, 0, bytes(NONCE_SIZE)))
    stream.volume = volume
    return stream, volume, writer, b


def test_each_sealed_epoch_is_written_by_its_own_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[tuple[int, int, bool]] = []  # epoch, bytes, on the event loop's thread
    real = ShadowVolume.apply_next

    def traced(self: ShadowVolume) -> None:
        if self._pending:
            epoch, records = self._pending[0]
            on_loop = threading.current_thread() is threading.main_thread()
            written.append((epoch, sum(r.length for r in records), on_loop))
        real(self)

    monkeypatch.setattr(ShadowVolume, "apply_next", traced)
    big = os.urandom(1 << 20)

    async def run() -> None:
        stream, volume, writer, b = await _stream(tmp_path, 64 << 20)
        volume.begin_stream()
        images = asyncio.ensure_future(stream._apply_images())
        try:
            for epoch, kind in [(1, Kind.DATA), (2, Kind.ZERO), (3, Kind.DATA), (4, Kind.DATA)]:
                if kind is Kind.DATA:
                    volume.stage(kind, 0, len(big), epoch, big)
                else:
                    volume.stage(kind, 0, BS, epoch)  # a small epoch: sealed inline
                stream.ends_queued += 1
                await stream._apply(Frame(FrameType.EPOCH_END, epoch=epoch), None)
            await stream.images.join()
            assert volume.pending() == 0
        finally:
            images.cancel()
            await asyncio.gather(images, return_exceptions=True)
            writer.close()
            b.close()
            volume.end_stream()

    asyncio.run(run())
    assert [epoch for epoch, _, _ in written] == [1, 2, 3, 4]
    assert [epoch for epoch, size, on_loop in written if on_loop and size >= 1 << 20] == []
    with open(tmp_path / "v1.img", "rb") as image:  # epoch 4, the last, wrote it
        assert image.read(len(big)) == big


def test_a_stream_cancelled_twice_waits_for_its_writeback(tmp_path: Path) -> None:
    """Superseded, then cancelled again (shutdown, release) while its tasks wind down: the
    stream still waits for the writeback hint's thread before the end of the stream closes
    the image (the hint would write back whatever file took the descriptor's number)."""

    async def run() -> bool:
        stream, volume, writer, b = await _stream(tmp_path, 1 << 20)
        volume.apply_next = lambda: time.sleep(0.3)  # the image task busy in a worker thread
        frames = asyncio.ensure_future(stream._frames())
        try:
            await asyncio.sleep(0.05)
            stream.unacked += 1
            await stream.images.put((1, False))
            hint = asyncio.ensure_future(asyncio.to_thread(time.sleep, 1.0))  # a slow hint
            stream.writeback = hint
            await asyncio.sleep(0.05)
            frames.cancel()  # superseded
            await asyncio.sleep(0.05)
            frames.cancel()  # and again, while the tasks are being gathered
            await asyncio.gather(frames, return_exceptions=True)
            return hint.done()
        finally:
            writer.close()
            b.close()

    assert asyncio.run(run())
