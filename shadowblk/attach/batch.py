"""Frames written during one event-loop turn leave in one send (writev), not one send each.

With a pipelining client, one turn of the loop often completes several requests; a system call
per reply or per forwarded request is the router's largest cost after Python itself.
"""

from __future__ import annotations

import asyncio


class Batcher:
    """Collects frames for WRITER and flushes them once, at the end of the current loop turn."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.parts: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    def write(self, header: bytes, data: bytes = b"") -> None:
        if not self.parts:
            self.loop.call_soon(self.flush)
        self.parts.append(header)
        if data:
            self.parts.append(data)

    def flush(self) -> None:
        parts, self.parts = self.parts, []
        if parts and not self.writer.is_closing():
            self.writer.writelines(parts)
