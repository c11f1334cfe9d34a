"""FrameReader: the receiving side of a real loopback connection taken over from its
StreamReader. Frames come out whole and in order however TCP cuts them, the connection's
writer keeps working, and a bad header, EOF or silence end the reading as read_raw would."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable

import pytest

from shadowblk.delta.auth import Session
from shadowblk.delta.frames import HEADER_SIZE, MAX_PAYLOAD, Frame, FrameError, FrameType
from shadowblk.delta.stream import FrameReader, check, encode

KEY = b"k" * 32
Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def connected(send: Callable[[asyncio.StreamWriter], Awaitable[None]], receive: Peer):
    """Run SEND on a client connection and RECEIVE on the server's side of it."""
    done = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            done.set_result(await receive(reader, writer))
        except BaseException as exc:  # handed to the test
            done.set_exception(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await send(writer)
        return await asyncio.wait_for(done, 30)
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


def frames(count: int, rng: random.Random) -> list[Frame]:
    sizes = [0, 1, 4096, 70_000, 3 << 20, MAX_PAYLOAD]  # empty to bigger than a buffer
    return [
        Frame(FrameType.EXTENT, 7, 1, 2, seq, payload=os.urandom(rng.choice(sizes)))
        for seq in range(1, count + 1)
    ]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_frames_come_out_whole_and_in_order_however_tcp_cuts_them(seed: int) -> None:
    rng = random.Random(seed)
    sent = frames(12, rng)
    session = Session(KEY, b"n" * 16)
    wire = b"".join(encode(f, session) for f in sent)

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(wire[:100])  # some bytes wait in the StreamReader before the takeover
        await writer.drain()
        await asyncio.sleep(0.05)
        pos = 100
        while pos < len(wire):
            n = rng.choice([1, 7, HEADER_SIZE - 1, 4096, 1 << 20])
            writer.write(wire[pos : pos + n])
            await writer.drain()
            pos += n
            if rng.random() < 0.2:
                await asyncio.sleep(0.001)
        await writer.drain()

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await asyncio.sleep(0.02)
        got = []
        reader_frames = FrameReader.attach(reader, writer)
        for _ in sent:
            got.append(check(await reader_frames.read(10), session))
        writer.write(b"still writable")  # the writer keeps its own protocol's flow control
        await writer.drain()
        return got

    got = asyncio.run(connected(send, receive))
    assert [(f.seq, f.payload) for f in got] == [(f.seq, f.payload) for f in sent]


def test_a_bad_header_eof_and_silence_end_the_reading() -> None:
    session = Session(KEY, b"n" * 16)
    good = encode(Frame(FrameType.PING, 7, 1, 2, 1), session)

    async def reading(wire: bytes, close: bool, timeout: float) -> list[object]:
        async def send(writer: asyncio.StreamWriter) -> None:
            writer.write(wire)
            await writer.drain()
            if close:
                writer.write_eof()
            await asyncio.sleep(0.5)

        async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            got = FrameReader.attach(reader, writer)
            out: list[object] = []
            while True:
                try:
                    out.append(check(await got.read(timeout), session).seq)
                except (FrameError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    out.append(type(exc))
                    return out

        return await connected(send, receive)

    damaged = bytearray(good)
    damaged[10] ^= 0xFF
    assert asyncio.run(reading(good + bytes(damaged), False, 5)) == [1, FrameError]
    assert asyncio.run(reading(good + good[:20], True, 5)) == [1, asyncio.IncompleteReadError]
    assert asyncio.run(reading(good, False, 0.2)) == [1, TimeoutError]
