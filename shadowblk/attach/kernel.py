"""The device-mapper attach: /dev/mapper/NAME, dm-linear over the kernel NBD client.

The VM's volume is a dm-linear device over /dev/nbdX, connected to the primary's export. A
switchover connects /dev/nbdY to the new primary first, then suspends NAME (new I/O waits in
device-mapper, in-flight I/O completes on the old primary) and resumes with the table over
/dev/nbdY, loaded before the suspend: the VM sees a pause, never an error. Then /dev/nbdX is
disconnected. A table is loaded over /dev/nbdY only once the kernel has started it (KernelNBD
returns then): a write that reaches it before has no capacity to land in and fails with EIO.
The device-mapper and NBD calls are ioctls made in this process (shadowblk.kernel), so nothing
in the paused window starts a process. The suspends skip the file-system freeze: both tables
hold the same data, so dirty pages may reach the new one.

The swap is one ioctl: a resume of the running device with the new table loaded, which the
kernel turns into suspend, swap, resume, so that no window is left in which the device stays
suspended while this process is between two calls (descheduled, or killed there: the VM's I/O
would hang). Measured, it is no faster than the two ioctls (the kernel's own work under a
descheduled vCPU is most of the pause: docs/attach.md); SWAP="two" makes those two ioctls, for
that comparison (tools/bench/dm_pause.py). A device already suspended (pause(), or a lost
connection) gets the resume alone, which swaps and lets the held I/O through.

A dead primary: the kernel NBD client gives up on a request after NBD_TIMEOUT s (the request
fails; a silent host would otherwise hold it, and any suspend, for ever). When the connection
under the device ends by itself, the device is suspended at once, so that new I/O waits in
device-mapper instead of failing on the dead /dev/nbdX, and ON_LOST is called (the follower
asks the manager at once); the next repoint resumes it, or HOLD_TIME s do (then I/O fails).

A repoint connects outside the lock that orders the table swaps, so that a reconnect to an
endpoint that does not answer (the follower's, after a loss) holds no other repoint: the
manager's, at a higher generation, swaps the table meanwhile, and the reconnect, once
connected, is refused as older. A reconnect (the endpoint under the device now) gets
RECONNECT_TIMEOUT_S to connect and shake hands: a server that is back answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shadowblk.attach.router import Refused
from shadowblk.attach.upstream import Target as Export
from shadowblk.attach.upstream import UpstreamError
from shadowblk.kernel.dm import MAPPER, DeviceMapper, DMError, Target
from shadowblk.kernel.nbd import TIMEOUT_S, KernelNBD
from shadowblk.nbd.client import NBDError

log = logging.getLogger(__name__)

SECTOR = 512
CONNECT_TIMEOUT_S = 30.0  # to a new primary, maybe just promoted on a loaded host
RECONNECT_TIMEOUT_S = 2.0  # to the endpoint that just dropped: back now, or not worth waiting


SWAPS = ("one", "two")  # the table swap in one ioctl (resume) or two (suspend, then resume)


@dataclass
class Switch:
    """What one table swap measured, in milliseconds (monotonic clock of this host)."""

    uri: str
    generation: int
    device: str  # the /dev/nbdY now under the volume
    ioctls: int  # 1: the resume suspends, swaps and resumes; 2: a suspend, then the resume
    pause_ms: float  # first swap ioctl issued -> resume returned (after a pause(), I/O
    # waited since that too): the device holds I/O this long at most
    suspend_ms: float | None  # of which the suspend ioctl (the drain); None: no such ioctl
    resume_ms: float  # the resume ioctl (with one ioctl: the whole pause)
    load_ms: float  # the new table's load, before the pause (not part of it)
    connect_ms: float  # the new NBD connection, made before the load
    started_at: float  # time.monotonic() when the pause began, to place it among other events

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def linear(nbd: KernelNBD) -> list[Target]:
    return [Target(0, nbd.size // SECTOR, "linear", f"{nbd.device} 0")]


class KernelAttach:
    """One volume's /dev/mapper/NAME; `repoint` has the router's contract (control.py)."""

    def __init__(
        self,
        name: str,
        nbd_timeout: int = TIMEOUT_S,
        hold_time: float = 30.0,
        on_lost: Callable[[], None] | None = None,
        dm: DeviceMapper | None = None,
        device: Callable[..., KernelNBD] = KernelNBD,
        swap: str = "one",
    ) -> None:
        """DM and DEVICE (how a connection is made, KernelNBD's signature) are there for the
        tests of the ordering on a host without the kernel's device-mapper and NBD client;
        SWAP (one of SWAPS) for the benchmark's comparison of the two ways to swap."""
        if swap not in SWAPS:
            raise ValueError(f"swap: one of {', '.join(SWAPS)}, not {swap!r}")
        self.name, self.nbd_timeout, self.hold_time = name, nbd_timeout, hold_time
        self.swap = swap
        self.on_lost = on_lost
        self.dm = dm if dm is not None else DeviceMapper()
        self._device = device
        self.nbd: KernelNBD | None = None
        self.uri = ""
        self.generation = -1
        self.switches: list[Switch] = []
        self.paused = False
        self.losses = 0  # connections that ended by themselves
        self._pauses = 0  # a pause's limit timer only resumes if nothing came after it
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    @property
    def device(self) -> Path:
        return MAPPER / self.name

    @property
    def upstream_uri(self) -> str | None:
        return self.uri if self.nbd is not None else None

    @property
    def upstream_alive(self) -> bool:
        return bool(self.nbd and self.nbd.connected)

    def _connect(self, uri: str) -> tuple[KernelNBD, str]:
        try:
            export = Export.parse(uri)
        except UpstreamError as exc:
            raise Refused(422, str(exc)) from None
        nbd: KernelNBD | None = None

        def ended() -> None:  # the device's thread: over to the loop
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._ended, nbd)

        again = self.nbd is not None and str(export) == self.uri
        connect_s = RECONNECT_TIMEOUT_S if again else CONNECT_TIMEOUT_S
        try:
            nbd = self._device(
                export.host, export.port, export.name, self.nbd_timeout, ended, connect_s
            )
        except (OSError, NBDError) as exc:
            raise Refused(502, f"{export}: {exc}") from None
        return nbd, str(export)

    def _ended(self, nbd: KernelNBD | None) -> None:
        """A connection ended: if it is the one under the device and nobody closed it, hold
        the device's I/O and say so."""
        if nbd is None or nbd is not self.nbd or self._closing:
            return
        self.losses += 1
        log.error("the connection to %s ended (%s): holding I/O up to %.0f s", self.uri,
                  nbd.error or "closed by the server", self.hold_time)  # fmt: skip
        asyncio.get_running_loop().create_task(self._hold(nbd))

    async def _hold(self, nbd: KernelNBD) -> None:
        async with self._lock:
            if nbd is not self.nbd or self._closing:
                return  # a repoint replaced it meanwhile
            try:
                await self._pause(self.hold_time)
            except DMError as exc:
                log.error("cannot suspend %s: %s", self.name, exc)
        if self.on_lost is not None:
            self.on_lost()

    async def open(self, uri: str, generation: int) -> None:
        """Connect the first primary and create the device over it."""
        self._loop = asyncio.get_running_loop()
        self.nbd, self.uri = await asyncio.to_thread(self._connect, uri)
        try:
            await asyncio.to_thread(self.dm.create, self.name, linear(self.nbd))
        except DMError:
            await asyncio.to_thread(self.nbd.close)
            raise
        self.generation = generation

    async def repoint(self, uri: str, generation: int, replay: bool = False) -> Switch:
        """Swap the device over to URI's export. REPLAY (resend the writes since the last
        FLUSH, as the router can; the manager asks for it after every emergency) cannot be
        done, the kernel's NBD client keeping none: the swap goes ahead with a warning, since
        refusing it would leave the VM on a dead primary. The connection is made before the
        lock is taken; a repoint at a higher generation that swapped meanwhile wins (this
        one is refused as older)."""
        if replay:
            log.warning(
                "%s: a replay was asked for; the kernel NBD client keeps no unflushed writes, "
                "so writes since the last FLUSH that %s lacks are lost",
                self.name, uri,
            )  # fmt: skip
        self._not_older(generation)
        start = time.monotonic()
        new, uri = await asyncio.to_thread(self._connect, uri)
        connect_ms = (time.monotonic() - start) * 1000
        swapped = False
        try:
            async with self._lock:
                self._not_older(generation)
                assert self.nbd is not None
                if new.size != self.nbd.size:
                    raise Refused(409, f"{uri} is {new.size} bytes, the volume {self.nbd.size}")
                try:
                    times = await asyncio.to_thread(self._swap, new)
                except DMError as exc:
                    raise Refused(502, f"table swap failed: {exc}") from None
                old, self.nbd, self.uri, self.generation = self.nbd, new, uri, generation
                swapped = True
                self.paused = False
                self._pauses += 1
                switch = Switch(uri, generation, str(new.device), connect_ms=connect_ms, **times)
                self.switches.append(switch)
        finally:
            if not swapped:
                await asyncio.to_thread(new.close)
        await asyncio.to_thread(old.close)  # not under the lock: it no longer holds the device
        return switch

    def _not_older(self, generation: int) -> None:
        if generation < self.generation:
            raise Refused(409, f"generation {generation} is older than {self.generation}")

    async def pause(self, limit: float) -> float:
        """Suspend the device (the fencing period of a planned switchover): new I/O waits in
        device-mapper, in-flight I/O completes. The next repoint or resume lets I/O through, or
        LIMIT seconds do. Returns the drain in ms (the suspend's duration)."""
        async with self._lock:
            return await self._pause(limit)

    async def _pause(self, limit: float) -> float:
        start = time.monotonic()
        await asyncio.to_thread(self.dm.suspend, self.name, lockfs=False)
        self.paused = True
        self._pauses += 1
        asyncio.get_running_loop().call_later(limit, self._unpause, self._pauses)
        return (time.monotonic() - start) * 1000

    def _unpause(self, number: int) -> None:
        if number == self._pauses and self.paused:
            log.warning("no repoint came after a pause: resuming on the current primary")
            self.resume()

    def resume(self) -> None:
        """Let I/O through on the current table (a switchover that did not happen)."""
        self._pauses += 1
        if self.paused:
            self.dm.resume(self.name)
            self.paused = False

    def _swap(self, new: KernelNBD) -> dict[str, Any]:
        """Load the new table (inactive: I/O still flows), then swap it in: one resume ioctl
        (the kernel suspends the running device inside it), or with SWAP "two" a suspend ioctl
        first; a device already suspended gets the resume alone. Switch's timing fields. A
        failed swap drops the loaded table and resumes the device on the old one, unless a
        pause holds it (its limit, or the next repoint, resumes it)."""
        t0 = time.monotonic()
        self.dm.load(self.name, linear(new))
        t1 = time.monotonic()
        two = self.swap == "two" and not self.paused
        try:
            if two:
                self.dm.suspend(self.name, lockfs=False)
            t2 = time.monotonic()
            self.dm.resume(self.name, lockfs=False)
        except DMError:
            with contextlib.suppress(DMError):
                self.dm.clear(self.name)
            if not self.paused:  # even when the clear failed: never left suspended unheld
                with contextlib.suppress(DMError):
                    self.dm.resume(self.name, lockfs=False)
            raise
        t3 = time.monotonic()
        return {"ioctls": 2 if two else 1, "pause_ms": (t3 - t1) * 1000,
                "suspend_ms": (t2 - t1) * 1000 if two else None, "resume_ms": (t3 - t2) * 1000,
                "load_ms": (t1 - t0) * 1000, "started_at": t1}  # fmt: skip

    def status(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "upstream": self.uri,
            "nbd": str(self.nbd.device) if self.nbd else None,
            "upstream_alive": bool(self.nbd and self.nbd.connected),
            "paused": self.paused,
            "generation": self.generation,
            "repoints": len(self.switches),
            "losses": self.losses,
            "last_repoint": self.switches[-1].to_dict() if self.switches else None,
        }

    def close(self) -> None:
        """Remove the device (refused while something holds it open) and disconnect."""
        self._closing = True
        try:
            self.dm.remove(self.name)
        finally:
            if self.nbd is not None:
                self.nbd.close()
            self.dm.close()
