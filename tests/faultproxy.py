"""A TCP proxy for fault injection: drops, delays, truncates and corrupts the bytes it forwards.

Seeded: the faults are drawn from random.Random(seed), one draw per forwarded chunk (chunk
boundaries depend on timing, so a run is repeatable in its fault mix, not byte for byte). A
gate closes the proxy entirely: open connections are cut and new ones are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from dataclasses import dataclass


@dataclass
class Faults:
    drop: float = 0.0  # per chunk: close both sides
    delay: float = 0.0  # per chunk: hold it up to max_delay seconds
    truncate: float = 0.0  # per chunk: forward a prefix, then close
    corrupt: float = 0.0  # per chunk: flip one byte
    max_delay: float = 0.2


@dataclass
class Counts:
    connections: int = 0
    drops: int = 0
    delays: int = 0
    truncations: int = 0
    corruptions: int = 0


class FaultProxy:
    """Listens on 127.0.0.1:port (bound to 0) and forwards to TARGET_PORT, in its own thread."""

    def __init__(self, target_port: int, seed: int, faults: Faults | None = None) -> None:
        self.target_port = target_port
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.counts = Counts()
        self.gate_open = True
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        self._cut_all()

    def set_gate(self, open_: bool) -> None:
        """Close: cut every connection and refuse new ones until opened again."""
        done = threading.Event()

        def apply() -> None:
            self.gate_open = open_
            if not open_:
                self._cut_all()
            done.set()

        self._loop.call_soon_threadsafe(apply)
        done.wait(10)

    def _cut_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if not self.gate_open:
            c_writer.transport.abort()
            return
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            c_writer.transport.abort()
            return
        self.counts.connections += 1
        self._writers |= {c_writer, s_writer}
        pair = (c_writer, s_writer)
        await asyncio.gather(
            self._pump(c_reader, s_writer, pair), self._pump(s_reader, c_writer, pair)
        )

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        f = self.faults
        try:
            while chunk := await reader.read(65536):
                roll = self.rng.random()
                if roll < f.drop:
                    self.counts.drops += 1
                    break
                roll -= f.drop
                if roll < f.truncate:
                    self.counts.truncations += 1
                    writer.write(chunk[: self.rng.randrange(len(chunk))])
                    await writer.drain()
                    break
                roll -= f.truncate
                if roll < f.corrupt:
                    self.counts.corruptions += 1
                    data = bytearray(chunk)
                    data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
                    chunk = bytes(data)
                roll -= f.corrupt
                if roll < f.delay:
                    self.counts.delays += 1
                    await asyncio.sleep(self.rng.uniform(0, f.max_delay))
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in pair:
                w.transport.abort()
                self._writers.discard(w)
            with contextlib.suppress(Exception):
                await writer.wait_closed()
