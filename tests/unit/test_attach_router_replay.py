"""When the router replays its unflushed writes, over real NBD servers (nbdkit): every write
acknowledged to the VM must reach the new primary, whatever brings the repoint (the manager's
push, the follower's poll) and however the old primary went (gone silently, fenced undrained).
The replay's scheduling alone: tests/unit/test_attach_replay.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Coroutine

from shadowblk.attach.router import Router
from shadowblk.nbd import protocol as P
from tests.procs import Processes

B = 4096


def memory(procs: Processes, *args: str) -> tuple[subprocess.Popen, str]:
    """`nbdkit memory 8M` with ARGS before the plugin (filters) and after it (their settings),
    split at the plugin; answering once its port does."""
    filters = [a for a in args if a.startswith("--filter")]
    params = [a for a in args if not a.startswith("--filter")]
    return procs.start_nbdkit([*filters, "memory", "8M", *params])


async def call(
    router: Router, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0
) -> tuple[int, bytes]:
    fut = asyncio.get_running_loop().create_future()
    router.submit(cmd, flags, offset, length, data, lambda e, d: fut.set_result((e, d)))
    return await fut


async def replayed(router: Router) -> None:
    while router.status()["replaying"]:
        await asyncio.sleep(0.02)


async def written(upstream: str, hold_time: float, drain_timeout: float) -> Router:
    """A router on UPSTREAM with one acknowledged, unflushed write: block 0 full of W."""
    router = Router(hold_time=hold_time, drain_timeout=drain_timeout)
    await router.repoint(upstream, 1)
    assert await call(router, P.CMD_WRITE, 0, B, b"W" * B) == (0, b"")
    return router


def run(coro: Coroutine) -> None:
    asyncio.run(asyncio.wait_for(coro, 120))


def test_the_followers_repoint_in_an_undrained_pause_replays(procs: Processes) -> None:
    """A planned switchover's fence did not drain: the manager pauses, then will push
    replay: true. The follower's poll repoints first (no flag); a VM FLUSH then empties the
    log, so the push has nothing left to replay: the follower's repoint must have replayed."""
    _, a = memory(procs)
    _, b = memory(procs)

    async def main() -> None:
        router = await written(a, 10, 2)
        await router.pause(10)  # the manager's pause
        await router.repoint(b, 2)  # the follower's poll
        assert (await call(router, P.CMD_READ, 0, B))[1] == b"W" * B
        assert (await call(router, P.CMD_FLUSH))[0] == 0
        assert not router.unflushed.writes
        repoints = router.repoints
        await router.repoint(b, 2, replay=True)  # the manager's push: nothing to redo
        assert router.repoints == repoints  # answered at once: that repoint replayed the log
        assert (await call(router, P.CMD_READ, 0, B))[1] == b"W" * B
        await router.close()

    run(main())


def test_the_managers_push_after_a_drained_fence_replays_nothing(procs: Processes) -> None:
    """replay: false (the manager's planned switchover, fence drained): the new primary has
    every acknowledged write, nothing is resent."""
    _, a = memory(procs)
    _, b = memory(procs)

    async def main() -> None:
        router = await written(a, 10, 2)
        await router.pause(10)
        result = await router.repoint(b, 2, replay=False)
        assert result.replay_writes == 0 and router.replayed == 0
        await router.close()

    run(main())


def test_a_primary_gone_silently_loses_no_acknowledged_write(procs: Processes) -> None:
    """The primary stops answering without closing its connection (SIGSTOP: a power loss or a
    partition), a write in flight on it. Whatever the repoint says, the write acknowledged
    before is replayed: the manager's emergency push asks for it, and a drain that times out
    counts as a loss even when the push does not."""
    pa, a = memory(procs)
    _, b = memory(procs)
    _, c = memory(procs)

    async def main() -> None:
        router = await written(a, 30, 1)
        os.kill(pa.pid, signal.SIGSTOP)
        try:
            late = asyncio.ensure_future(call(router, P.CMD_WRITE, B, B, b"L" * B))
            await asyncio.sleep(0.3)
            assert not late.done() and router.upstream_alive  # nothing tells it is gone
            result = await router.repoint(b, 2, replay=False)  # the drain times out
            assert result.replay_writes == 1, result
            assert await late == (0, b"")  # retried on b once a's connection was closed
            await replayed(router)
            assert (await call(router, P.CMD_READ, 0, 2 * B))[1] == b"W" * B + b"L" * B
            result = await router.repoint(c, 3, replay=True)  # the emergency push
            assert result.replay_writes == 2, result
            await replayed(router)
            assert (await call(router, P.CMD_READ, 0, 2 * B))[1] == b"W" * B + b"L" * B
        finally:
            os.kill(pa.pid, signal.SIGCONT)
        await router.close()

    run(main())


def test_a_newer_write_hurried_past_an_older_wide_one_is_not_undone(procs: Processes) -> None:
    """An older write over 1 MiB covers block 5, a newer one-block write on 5 follows; a READ
    of block 5 comes during the replay on a slow new primary: it reads the newer write, and so
    does every READ after the replay."""
    pa, a = memory(procs)
    _, b = memory(procs, "--filter=delay", "wdelay=200ms")

    async def main() -> None:
        router = Router(hold_time=30, drain_timeout=5)
        await router.repoint(a, 1)
        for i in range(8):
            await call(router, P.CMD_WRITE, (1000 + i) * B, B, b"a" * B)
        await call(router, P.CMD_WRITE, 0, 300 * B, b"O" * (300 * B))
        await call(router, P.CMD_WRITE, 5 * B, B, b"N" * B)
        procs.stop(pa, signal.SIGKILL)
        while router.upstream_alive:
            await asyncio.sleep(0.02)
        await router.repoint(b, 2)
        assert (await call(router, P.CMD_READ, 5 * B, B))[1] == b"N" * B
        await replayed(router)
        assert (await call(router, P.CMD_READ, 5 * B, B))[1] == b"N" * B
        await router.close()

    run(main())


def test_a_replayed_fast_zero_is_applied_where_fast_zero_fails(procs: Processes) -> None:
    """The old primary zeroed fast; the new one fails every fast zero (ENOTSUP): the replayed
    zeroing still happens."""
    pa, a = memory(procs)
    _, b = memory(procs, "--filter=nozero", "zeromode=plugin", "fastzeromode=slow")

    async def main() -> None:
        router = Router(hold_time=30, drain_timeout=2)
        await router.repoint(a, 1)
        data = b"W" * (2 * B)
        assert await call(router, P.CMD_WRITE, 0, 2 * B, data) == (0, b"")
        zeroed = await call(router, P.CMD_WRITE_ZEROES, 0, B, flags=P.CMD_FLAG_FAST_ZERO)
        assert zeroed == (0, b"")
        procs.stop(pa, signal.SIGKILL)
        while router.upstream_alive:
            await asyncio.sleep(0.02)
        await router.repoint(b, 2)
        await replayed(router)
        assert (await call(router, P.CMD_READ, 0, 2 * B))[1] == bytes(B) + b"W" * B
        await router.close()

    run(main())


def test_a_failed_replay_write_keeps_the_log_for_the_next_primary(procs: Processes) -> None:
    """Every write fails on the new primary (EIO): the replay is not whole, so no FLUSH may
    empty the log; the next repoint replays it all."""
    pa, a = memory(procs)
    _, b = memory(procs, "--filter=error", "error-pwrite=EIO", "error-pwrite-rate=1")
    _, c = memory(procs)

    async def main() -> None:
        router = await written(a, 30, 2)
        procs.stop(pa, signal.SIGKILL)
        while router.upstream_alive:
            await asyncio.sleep(0.02)
        await router.repoint(b, 2)
        flush = asyncio.ensure_future(call(router, P.CMD_FLUSH))
        await replayed(router)
        assert not router.upstream_alive  # closed: the follower repoints again
        assert len(router.unflushed.writes) == 1
        result = await router.repoint(c, 3)
        assert result.replay_writes == 1, result
        assert (await flush)[0] == 0  # on c, after the replay
        assert (await call(router, P.CMD_READ, 0, B))[1] == b"W" * B
        await router.close()

    run(main())
