"""The ordering of the device-mapper attach's repoints (shadowblk/attach/kernel.py), on a host
without the kernel's device-mapper and NBD client: the table calls go to a recorder (the
DeviceMapper methods the attach uses), the connections are real NBD handshakes with real
servers on loopback (KernelNBD's contract, without /dev/nbdN). The swaps themselves run in
the kernel lab (tests/kernel/test_dm_switch.py)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shadowblk.attach import kernel
from shadowblk.attach.kernel import KernelAttach
from shadowblk.attach.router import Refused
from shadowblk.kernel.dm import DMError, Target
from shadowblk.nbd.backend import Backend
from shadowblk.nbd.client import NBDClient
from shadowblk.nbd.handshake import Export
from shadowblk.nbd.server import NBDServer

SIZE = 1 << 20


class Tables:
    """The DeviceMapper calls, recorded; FAIL: the calls to refuse (as the kernel would)."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = list(fail)

    def create(self, name: str, targets: list[Target]) -> None:
        self.calls.append(("create", targets[0].params))

    def load(self, name: str, targets: list[Target]) -> None:
        self.calls.append(("load", targets[0].params))

    def suspend(self, name: str, lockfs: bool = True) -> None:
        self.calls.append(("suspend", name))
        self._refuse("suspend")

    def resume(self, name: str, lockfs: bool = True) -> None:
        """A resume that swaps a loaded table in suspends first, with LOCKFS (do_resume)."""
        self.calls.append(("resume", name if lockfs else f"{name} skip-lockfs"))
        self._refuse("resume")

    def _refuse(self, call: str) -> None:
        if self.fail and self.fail[0] == call:
            self.fail.pop(0)
            raise DMError(errno.EINTR, f"device-mapper: {call} interrupted")

    def clear(self, name: str) -> None:
        self.calls.append(("clear", name))
        self._refuse("clear")

    def remove(self, name: str) -> None:
        self.calls.append(("remove", name))

    def close(self) -> None:
        """The control descriptor: none here."""


class UserNBD:
    """KernelNBD's contract without the kernel: the real handshake, no /dev/nbdN."""

    def __init__(
        self, host: str, port: int, name: str, timeout: int, on_end: Callable[[], None],
        connect_timeout: float,
    ) -> None:  # fmt: skip
        self.client = NBDClient(host, port, name, timeout=connect_timeout)
        self.size, self.on_end = self.client.size, on_end
        self.device = Path(f"/dev/nbd-{self.client.sock.getsockname()[1]}")
        self.ended = threading.Event()
        self.error: OSError | None = None

    @property
    def connected(self) -> bool:
        return not self.ended.is_set()

    def end(self) -> None:
        """The connection ends by itself (the server went away)."""
        self.ended.set()
        self.client.close()
        self.on_end()

    def close(self, timeout: float = 10.0) -> None:
        if not self.ended.is_set():
            self.ended.set()
            self.client.close()


class Gate:
    """A TCP forwarder to PORT; while it is closed, a new connection is taken and never
    answered (a host that does not answer), until it opens."""

    def __init__(self, port: int) -> None:
        self.target, self.open, self.waiting = port, threading.Event(), threading.Event()
        self.open.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/vol"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.socks.append(conn)
            threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        if not self.open.is_set():
            self.waiting.set()
        self.open.wait()
        up = socket.create_connection(("127.0.0.1", self.target))
        self.socks.append(up)
        threading.Thread(target=_pump, args=(up, conn), daemon=True).start()
        _pump(conn, up)

    def close(self) -> None:
        self.open.set()
        self.listener.close()
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[NBDServer]]:
    """Two NBD servers of 1 MiB volumes: the old primary and the new one."""
    running = []
    for name in ("a", "b"):
        backend = Backend.open(tmp_path / f"{name}.img", SIZE, False)
        server = NBDServer(Export("vol", backend), "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        running.append((server, thread))
    try:
        yield [server for server, _ in running]
    finally:
        for server, thread in running:
            server.stop()
            thread.join(30)


def recording(made: list[float]) -> Callable[..., UserNBD]:
    """UserNBD, each connect timeout recorded as the connection starts."""

    def device(*args: object) -> UserNBD:
        made.append(args[-1])  # type: ignore[arg-type]
        return UserNBD(*args)  # type: ignore[arg-type]

    return device


def test_a_reconnect_that_hangs_holds_no_repoint_and_loses_to_a_newer_generation(
    servers: list[NBDServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection to the primary (through the gate) drops and the follower reconnects to
    the same endpoint, which takes the connection and does not answer; the manager's repoint
    to the new primary (generation 2) swaps the table meanwhile, and the reconnect, answered
    at last, is refused as older (its connection closed), the device staying on the new one."""
    monkeypatch.setattr(kernel, "RECONNECT_TIMEOUT_S", 120.0)  # the gate, not a timeout, ends it
    gate, tables, made = Gate(servers[0].port), Tables(), []

    async def scenario() -> None:
        lost = asyncio.Event()
        attach = KernelAttach("vm", on_lost=lost.set, dm=tables, device=recording(made))  # type: ignore[arg-type]
        await attach.open(gate.uri, 1)
        first = attach.nbd
        assert isinstance(first, UserNBD)
        gate.open.clear()
        first.end()
        await lost.wait()
        assert attach.paused and tables.calls[-1] == ("suspend", "vm")  # I/O held
        reconnect = asyncio.create_task(attach.repoint(gate.uri, 1))  # the follower's
        await asyncio.to_thread(gate.waiting.wait)  # it is connecting, held at the gate
        # a hang guard, not a measure: holding the lock while connecting never returns here
        switch = await asyncio.wait_for(attach.repoint(servers[1].url, 2), 60)
        assert not reconnect.done()
        assert (attach.uri, attach.generation, attach.paused) == (servers[1].url, 2, False)
        # suspended by the hold already: the resume alone swaps and lets the held I/O through
        assert tables.calls[-3:] == [("suspend", "vm"), ("load", f"{switch.device} 0"),
                                     ("resume", "vm skip-lockfs")]  # fmt: skip
        assert switch.ioctls == 1 and switch.suspend_ms is None
        gate.open.set()
        with pytest.raises(Refused, match="older") as refused:
            await reconnect
        assert refused.value.status == 409
        assert (attach.uri, attach.generation) == (servers[1].url, 2)
        assert attach.nbd is not None and attach.nbd.connected
        assert [call for call, _ in tables.calls].count("load") == 1  # the reconnect swapped none

    try:
        asyncio.run(scenario())
    finally:
        gate.close()
    assert made == [kernel.CONNECT_TIMEOUT_S, 120.0, kernel.CONNECT_TIMEOUT_S]


def test_a_reconnect_to_an_endpoint_that_does_not_answer_gives_up_soon(
    servers: list[NBDServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconnect gets RECONNECT_TIMEOUT_S, not the timeout of a move to a new primary: the
    follower is told (502) and asks the manager again; the device stays held."""
    monkeypatch.setattr(kernel, "RECONNECT_TIMEOUT_S", 0.2)
    gate, tables, made = Gate(servers[0].port), Tables(), []

    async def scenario() -> None:
        lost = asyncio.Event()
        attach = KernelAttach("vm", on_lost=lost.set, dm=tables, device=recording(made))  # type: ignore[arg-type]
        await attach.open(gate.uri, 1)
        gate.open.clear()
        assert isinstance(attach.nbd, UserNBD)
        attach.nbd.end()
        await lost.wait()
        with pytest.raises(Refused, match="timed out") as refused:
            await attach.repoint(gate.uri, 1)
        assert refused.value.status == 502
        assert attach.paused and attach.generation == 1

    try:
        asyncio.run(scenario())
    finally:
        gate.close()
    assert made == [kernel.CONNECT_TIMEOUT_S, 0.2]


@pytest.mark.parametrize(
    ("swap", "calls"),
    [("one", [("resume", "vm skip-lockfs")]),
     ("two", [("suspend", "vm"), ("resume", "vm skip-lockfs")])],
)  # fmt: skip
def test_a_running_device_swaps_in_one_resume_ioctl_or_in_two(
    servers: list[NBDServer], swap: str, calls: list[tuple[str, str]]
) -> None:
    """One ioctl: the resume, the kernel suspending the running device inside it (without the
    freeze); "two": a suspend first. Either way the new table is loaded before the pause."""
    tables = Tables()

    async def scenario() -> None:
        attach = KernelAttach("vm", dm=tables, device=UserNBD, swap=swap)  # type: ignore[arg-type]
        await attach.open(servers[0].url, 1)
        switch = await attach.repoint(servers[1].url, 2)
        assert tables.calls[1:] == [("load", f"{switch.device} 0"), *calls]
        assert switch.ioctls == len(calls) and (switch.suspend_ms is None) == (swap == "one")
        assert (attach.uri, attach.generation, attach.paused) == (servers[1].url, 2, False)
        attach.close()

    asyncio.run(scenario())


def test_an_emergency_repoint_asking_for_a_replay_still_swaps(
    servers: list[NBDServer], caplog: pytest.LogCaptureFixture
) -> None:
    """The manager asks every emergency repoint for a replay; the kernel's client keeps no
    writes to resend, so the swap goes ahead with a warning rather than leave the VM on a
    dead primary."""
    tables = Tables()

    async def scenario() -> None:
        attach = KernelAttach("vm", dm=tables, device=UserNBD)  # type: ignore[arg-type]
        await attach.open(servers[0].url, 1)
        await attach.repoint(servers[1].url, 2, replay=True)
        assert (attach.uri, attach.generation, attach.paused) == (servers[1].url, 2, False)
        attach.close()

    with caplog.at_level(logging.WARNING, logger=kernel.__name__):
        asyncio.run(scenario())
    assert "keeps no unflushed writes" in caplog.text


@pytest.mark.parametrize("fail", [("resume",), ("suspend",), ("resume", "clear")])
def test_a_failed_swap_drops_the_loaded_table_and_leaves_the_device_running(
    servers: list[NBDServer], fail: tuple[str, ...]
) -> None:
    """The swap's ioctl fails (a signal in the kernel's suspend): the repoint is refused (502),
    the loaded table is dropped, the device resumed on the old one (even when dropping the
    table fails too), the new connection closed."""
    swap = "one" if fail[0] == "resume" else "two"
    tables, made = Tables(fail), []

    def device(*args: object) -> UserNBD:
        made.append(UserNBD(*args))  # type: ignore[arg-type]
        return made[-1]

    async def scenario() -> None:
        attach = KernelAttach("vm", dm=tables, device=device, swap=swap)  # type: ignore[arg-type]
        await attach.open(servers[0].url, 1)
        with pytest.raises(Refused, match="interrupted") as refused:
            await attach.repoint(servers[1].url, 2)
        assert refused.value.status == 502
        assert tables.calls[-2:] == [("clear", "vm"), ("resume", "vm skip-lockfs")]
        assert (attach.uri, attach.generation, attach.paused) == (servers[0].url, 1, False)
        assert attach.nbd is made[0] and made[0].connected and not made[1].connected
        attach.close()

    asyncio.run(scenario())


def test_an_unknown_swap_is_refused() -> None:
    with pytest.raises(ValueError, match="one of one, two"):
        KernelAttach("vm", dm=Tables(), swap="three")  # type: ignore[arg-type]
