"""Write observers behind both transmission loops: the native loop hands each batch's writes to
the observers in one GIL acquisition, the Python loop one by one; either way every observer sees
a write before the volume does, in the order the volume gets them, a refused write never reaches
the volume, and on_flush runs after the flush and before its reply."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from shadowblk.integrity.checksum_map import ChecksumMap
from shadowblk.nbd import protocol as P
from shadowblk.nbd.backend import Backend
from shadowblk.nbd.checksums import ChecksumObserver
from shadowblk.nbd.client import NBDClient
from shadowblk.nbd.handshake import Export
from shadowblk.nbd.server import NBDServer
from shadowblk.tracking.tracker import WriteTracker

MiB = 1 << 20
SIZE = 4 * MiB
WINDOW = 64 * 1024  # the writes overlap inside it


@dataclass
class Recorder:
    """Records every change in order; checks, as it sees a write, that the volume lacks it."""

    image: Path
    seen: list[tuple[str, int, bytes]] = field(default_factory=list)
    flushes: int = 0
    refuse: set[int] = field(default_factory=set)  # offsets refused with ESHUTDOWN
    fenced: bool = False
    early: list[int] = field(default_factory=list)  # writes already on the volume when seen

    def _see(self, offset: int, data: bytes) -> None:
        if self.fenced or offset in self.refuse:
            raise OSError(errno.ESHUTDOWN, "refused")
        with open(self.image, "rb") as f:
            if os.pread(f.fileno(), len(data), offset) == data:
                self.early.append(offset)
        self.seen.append(("write", offset, data))

    def on_write(self, offset: int, data: bytes) -> None:
        self._see(offset, data)

    def on_zero(self, offset: int, length: int) -> None:
        self.seen.append(("zero", offset, bytes(length)))

    def on_trim(self, offset: int, length: int) -> None:
        self.seen.append(("zero", offset, bytes(length)))

    def on_flush(self) -> None:
        if self.fenced:
            raise OSError(errno.ESHUTDOWN, "refused")
        self.flushes += 1


@dataclass
class BatchRecorder(Recorder):
    """The same, taking the native loop's batches whole (the optional on_writes)."""

    batches: list[int] = field(default_factory=list)

    def on_writes(self, writes: Sequence[tuple[int, bytes]]) -> None:
        self.batches.append(len(writes))
        for offset, data in writes:
            self._see(offset, data)


@dataclass
class Running:
    server: NBDServer
    image: Path
    batch: BatchRecorder
    single: Recorder
    native: bool

    def client(self) -> NBDClient:
        return NBDClient("127.0.0.1", self.server.port, "vol")


@pytest.fixture(params=[True, False], ids=["native", "python"])
def srv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Running]:
    image = tmp_path / "vol.img"
    initial = np.random.default_rng(7).bytes(SIZE)
    image.write_bytes(initial)
    backend = Backend.open(image, None, False)
    tracker = WriteTracker(tmp_path / "state", SIZE, save_interval=3600)
    batch, single = BatchRecorder(image), Recorder(image)
    tracker.observers += [batch, single]
    server = NBDServer(
        Export("vol", backend), "127.0.0.1", 0, tracker=tracker, native=request.param
    )
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield Running(server, image, batch, single, request.param)
    finally:
        server.stop()
        thread.join(30)


def write_request(cookie: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return P.REQUEST.pack(P.REQUEST_MAGIC, flags, P.CMD_WRITE, cookie, offset, len(data)) + data


def test_observers_see_writes_first_and_in_volume_order(srv: Running) -> None:
    """Three connections pipeline overlapping writes (some FUA, some unaligned) and FLUSHes;
    replaying what the observers saw, in order, over the initial image gives the final one."""
    initial = bytearray(srv.image.read_bytes())

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with srv.client() as c:
            for burst in range(20):
                blob, sent = b"", 0
                for _ in range(16):
                    length = int(rng.choice([512, 4096, 4096, 8192, 1000]))
                    offset = int(rng.integers(0, WINDOW - length))
                    fua = P.CMD_FLAG_FUA if rng.random() < 0.1 else 0
                    blob += write_request(sent, offset, rng.bytes(length), fua)
                    sent += 1
                if burst % 4 == 3:
                    blob += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, sent, 0, 0)
                    sent += 1
                c.send(blob)
                assert all(c.reply().error == 0 for _ in range(sent))

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for recorder in (srv.batch, srv.single):
        replay = bytearray(initial)
        for _, offset, data in recorder.seen:
            replay[offset : offset + len(data)] = data
        assert replay == srv.image.read_bytes()
        assert len(recorder.seen) == 3 * 20 * 16
        assert recorder.flushes >= 3 * 5  # and one per FUA write
    assert srv.batch.seen == srv.single.seen
    # a write the observer saw was not on the volume yet (random data never repeats)
    assert srv.batch.early == [] and srv.single.early == []
    # the native loop hands over whole batches; the Python loop calls on_write per request
    assert bool(srv.batch.batches) == srv.native


def test_one_connection_s_writes_keep_their_order(srv: Running) -> None:
    """Pipelined writes to one block land, and reach the observers, in the order they were
    sent (the native loop's workers take the ordering lock before the next one may read)."""
    with srv.client() as c:
        for burst in range(30):
            values = [bytes([(burst * 16 + i) % 251]) * 4096 for i in range(16)]
            c.send(b"".join(write_request(i, 8192, v) for i, v in enumerate(values)))
            assert all(c.reply().error == 0 for _ in values)
            assert c.pread(8192, 4096) == values[-1]
    seen = [data for _, offset, data in srv.batch.seen if offset == 8192]
    assert seen == [bytes([k % 251]) * 4096 for k in range(30 * 16)]


def test_on_flush_runs_before_the_reply(srv: Running) -> None:
    entered, release, replied = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(30)

    srv.single.on_flush = hold  # type: ignore[method-assign]
    with srv.client() as c:
        c.pwrite(b"x" * 4096, 0)

        def flush() -> None:
            c.flush()
            replied.set()

        t = threading.Thread(target=flush)
        t.start()
        assert entered.wait(30)
        assert not replied.wait(0.3)  # held in on_flush: no reply yet
        release.set()
        t.join(30)
        assert replied.is_set()


def test_a_fua_write_is_a_flush_to_the_observers(srv: Running) -> None:
    """Each FUA write, small or big (64 KiB and more take the pipe in the native loop when
    nothing observes; here they must not), reaches every observer's on_flush before its reply."""
    with srv.client() as c:
        for n, length in enumerate((4096, 65536, MiB), start=1):
            c.send(write_request(n, 0, bytes([n]) * length, P.CMD_FLAG_FUA))
            assert c.reply().error == 0
            assert srv.batch.flushes == srv.single.flushes == n
    assert srv.image.read_bytes()[:MiB] == bytes([3]) * MiB


def test_refused_writes_fail_with_the_observers_error(srv: Running) -> None:
    """A refused write gets the observer's errno (ESHUTDOWN: a fenced primary) and never
    reaches the volume; each pipelined write is on the volume exactly when its reply is OK."""
    before = srv.image.read_bytes()
    srv.single.refuse = {8192}  # the observer without on_writes: refusals write by write
    with srv.client() as c:
        blob = b"".join(write_request(i, i * 4096, bytes([0x80 + i]) * 4096) for i in range(6))
        c.send(blob)
        replies = {r.cookie: r.error for r in (c.reply() for _ in range(6))}
        assert replies[2] == P.ESHUTDOWN and replies[0] == replies[1] == 0
        after = srv.image.read_bytes()
        for i, error in replies.items():  # the native loop also fails the rest of the batch
            assert error in (0, P.ESHUTDOWN)
            want = before[i * 4096 : (i + 1) * 4096] if error else bytes([0x80 + i]) * 4096
            assert after[i * 4096 : (i + 1) * 4096] == want
        srv.batch.fenced = True
        c.send(write_request(9, 40960, b"y" * 4096, P.CMD_FLAG_FUA))
        assert c.reply().error == P.ESHUTDOWN
        c.request(P.CMD_FLUSH)
        assert c.reply().error == P.ESHUTDOWN
        assert c.pread(0, 4096) == bytes([0x80]) * 4096  # reads still work
    assert srv.image.read_bytes()[40960:45056] == before[40960:45056]


def _assert_batch_map_matches_volume(tmp_path: Path, writes: list[tuple[int, bytes]]) -> None:
    """The map after on_writes(WRITES), none of it on the volume yet when the map sees it,
    must equal the one built from the volume once the batch is written."""
    image = tmp_path / "vol.img"
    image.write_bytes(np.random.default_rng(3).bytes(SIZE))
    backend = Backend.open(image, None, False)
    (tmp_path / "state").mkdir()
    observer = ChecksumObserver(tmp_path / "state", backend, 4096, checkpoint=3600)
    observer.on_writes(writes)
    for offset, data in writes:
        backend.pwrite(data, offset)
    expected = ChecksumMap.build(image, tmp_path / "fresh.map", 4096)
    assert np.array_equal(observer.map.crcs, expected.crcs)
    expected.close()
    observer.close()
    backend.close()


def test_checksum_batch_lays_earlier_writes_over_partial_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    writes = []
    for _ in range(40):
        length = int(rng.integers(1, 9000))
        writes.append((int(rng.integers(0, 5 * 4096)), rng.bytes(length)))
    _assert_batch_map_matches_volume(tmp_path, writes)


def test_checksum_batch_mixes_whole_block_and_partial_writes_in_order(tmp_path: Path) -> None:
    """Whole-block writes take the C path, partial ones the overlay path; interleaved over the
    same few blocks, each block's entry must still come from the last write of it."""
    rng = np.random.default_rng(5)
    writes = []
    for i in range(60):
        if i % 3:
            block, count = int(rng.integers(0, 6)), int(rng.integers(1, 3))
            writes.append((block * 4096, rng.bytes(count * 4096)))
        else:
            writes.append((int(rng.integers(0, 6 * 4096)), rng.bytes(int(rng.integers(1, 6000)))))
    _assert_batch_map_matches_volume(tmp_path, writes)
