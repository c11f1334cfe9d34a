"""Helpers of the scrub tests: damage one block of a backing file behind its server's back, and
read a block back to see it repaired."""

from __future__ import annotations

import os
from pathlib import Path

BS = 4096  # the block size of the volumes these tests scrub


def flip(image: Path, block: int) -> None:
    """Overwrite two bytes inside BLOCK of IMAGE (a bit rot no checksum map has seen)."""
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xde\xad", block * BS + 123)
    finally:
        os.close(fd)


def read_block(image: Path, block: int) -> bytes:
    with image.open("rb") as f:
        f.seek(block * BS)
        return f.read(BS)
