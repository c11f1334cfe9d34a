"""The replay's scheduling (shadowblk/attach/replay.py) on an upstream that records what
arrives: the order two writes on one block reach the new primary, and what a failed replay
write does. The router over real NBD servers: tests/unit/test_attach_router_replay.py."""

from __future__ import annotations

import asyncio

from shadowblk.attach.replay import BLOCK, WIDE, Replay
from shadowblk.attach.unflushed import Write
from shadowblk.nbd import protocol as P


class Recorder:
    """An upstream that applies each write as it arrives (in send order) and answers after a
    delay: what a new primary would hold, and the flags each write came with. A write whose
    offset is in FAIL is answered with that error and not applied, a fast zero with ENOTSUP
    (as a primary that cannot zero fast)."""

    target = "recorder"

    def __init__(self, fail: dict[int, int] | None = None) -> None:
        self.disk = bytearray((WIDE + 64) * BLOCK)
        self.sent: list[tuple[int, int]] = []  # (offset, flags)
        self.fail = fail or {}

    def send(self, cmd: int, flags: int, offset: int, length: int, payload: bytes, done) -> None:
        self.sent.append((offset, flags))
        error = P.ENOTSUP if flags & P.CMD_FLAG_FAST_ZERO else self.fail.get(offset, 0)
        if not error:
            self.disk[offset : offset + length] = payload if cmd == P.CMD_WRITE else bytes(length)
        asyncio.get_running_loop().call_later(0.01, done, error, b"")


def log_of(*writes: tuple[int, int, int, bytes]) -> list[Write]:
    """Writes (cmd, flags, offset, payload) in log order."""
    return [
        Write(seq, cmd, flags, offset, len(data), data if cmd == P.CMD_WRITE else b"")
        for seq, (cmd, flags, offset, data) in enumerate(writes, 1)
    ]


def test_a_hurried_write_never_overtakes_an_older_wide_write_on_its_block() -> None:
    """An older write wider than WIDE blocks covers block 5, a newer one-block write on 5
    follows; a READ of block 5 comes while earlier writes are in flight (the wide one waits for
    them). The small write must not be sent out of turn before the wide one."""

    async def main() -> tuple[Recorder, Replay]:
        up = Recorder()
        wide = (WIDE + 44) * BLOCK
        writes = log_of(
            *((P.CMD_WRITE, 0, (WIDE + 50 + i) * BLOCK, b"a" * BLOCK) for i in range(8)),
            (P.CMD_WRITE, 0, 0, b"O" * wide),  # older, wide
            (P.CMD_WRITE, 0, 5 * BLOCK, b"N" * BLOCK),  # newer, on block 5
        )
        replay = Replay(writes, up, lambda _up, why: None)
        await asyncio.sleep(0)  # the eight go out; the wide one waits for them
        assert replay.blocks(P.CMD_READ, 5 * BLOCK, BLOCK)
        await replay.cleared(P.CMD_READ, 5 * BLOCK, BLOCK)
        await replay.finished.wait()
        return up, replay

    up, replay = asyncio.run(main())
    order = [offset for offset, _ in up.sent]
    assert order.index(0) < order.index(5 * BLOCK), order
    assert bytes(up.disk[5 * BLOCK : 6 * BLOCK]) == b"N" * BLOCK
    assert replay.whole


def test_a_replayed_fast_zero_is_sent_without_the_fast_zero_flag() -> None:
    """The old primary zeroed fast; the new one may refuse a fast zero (ENOTSUP): the replay
    asks for the zeroing itself."""

    async def main() -> tuple[Recorder, Replay]:
        up = Recorder()
        up.disk[:BLOCK] = b"W" * BLOCK  # what the new primary held before the zeroing
        writes = log_of(
            (P.CMD_WRITE_ZEROES, P.CMD_FLAG_FAST_ZERO | P.CMD_FLAG_FUA, 0, bytes(BLOCK))
        )
        replay = Replay(writes, up, lambda _up, why: None)
        await replay.finished.wait()
        return up, replay

    up, replay = asyncio.run(main())
    assert up.sent == [(0, P.CMD_FLAG_FUA)]
    assert replay.whole and bytes(up.disk[:BLOCK]) == bytes(BLOCK)


def test_a_replay_write_that_fails_aborts_the_replay() -> None:
    """EIO, ENOSPC, EINVAL on a replay write: the write is not on the new primary, so the
    replay is not whole and the router is told (as for a lost upstream: it keeps the log)."""
    for error in (P.EIO, P.ENOSPC, P.EINVAL):

        async def main(error: int = error) -> tuple[Replay, list[str]]:
            up = Recorder(fail={BLOCK: error})
            writes = log_of(*((P.CMD_WRITE, 0, i * BLOCK, b"x" * BLOCK) for i in range(4)))
            told: list[str] = []
            replay = Replay(writes, up, lambda _up, why: told.append(why))
            await replay.finished.wait()
            return replay, told

        replay, told = asyncio.run(main())
        assert replay.aborted and not replay.whole, error
        assert len(told) == 1 and f"error {error}" in told[0], told
