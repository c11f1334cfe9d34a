"""A kernel `era` target, created or adopted, driven through the device-mapper ioctls.

Era arithmetic (as the kernel does it, see docs/dm-era.md): every resume starts a new era;
`checkpoint` and `take_metadata_snap` start a new one too (the snapshot records the era it
began); a suspend archives the current era's writeset and commits the metadata without
starting a new era, so the live metadata is consistent to read while the target is suspended.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shadowblk.kernel.dm import MAPPER, DeviceMapper, Target, block_device

SECTOR = 512


class EraTargetError(ValueError):
    """The device exists but is not a single era target, or a create lacks its devices."""


@dataclass(frozen=True)
class EraStatus:
    """`dmsetup status` of an era target: used/total metadata blocks, era, held snapshot."""

    metadata_used: int
    metadata_total: int
    current_era: int
    snapshot: int | None  # location of the held metadata snapshot, None when none is held

    @classmethod
    def parse(cls, line: str) -> EraStatus:
        _mbs, used_total, era, snap = line.split()[:4]
        used, total = used_total.split("/")
        return cls(int(used), int(total), int(era), None if snap == "-" else int(snap))


def _size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _device(spec: str) -> Path:
    """A table's device field (MAJOR:MINOR, or a path) as a /dev path."""
    if ":" in spec and not spec.startswith("/"):
        major, minor = spec.split(":")
        return block_device(os.makedev(int(major), int(minor)))
    return Path(spec)


class EraTarget:
    """One era target by name: its devices, its messages, suspend and resume."""

    def __init__(self, dm: DeviceMapper, name: str) -> None:
        self.dm = dm
        self.name = name
        table = dm.table(name)
        if len(table) != 1 or table[0].type != "era":
            raise EraTargetError(f"{name} is not a single era target: {table}")
        meta, origin, block_sectors = table[0].params.split()[:3]
        self.metadata = _device(meta)
        self.origin = _device(origin)
        self.block_size = int(block_sectors) * SECTOR
        self.size = table[0].length * SECTOR

    @classmethod
    def open(
        cls,
        dm: DeviceMapper,
        name: str,
        metadata: Path | None = None,
        origin: Path | None = None,
        block_size: int = 65536,
    ) -> EraTarget:
        """Adopt NAME if it exists, else create it over ORIGIN with its metadata on METADATA
        (a new metadata device must start zeroed: the kernel formats an all-zero one)."""
        if not dm.exists(name):
            if metadata is None or origin is None:
                raise EraTargetError(f"{name} does not exist: give its metadata and origin")
            if block_size % SECTOR:
                raise EraTargetError(f"era block size {block_size} is not whole sectors")
            sectors = _size(origin) // SECTOR
            params = f"{metadata} {origin} {block_size // SECTOR}"
            dm.create(name, [Target(0, sectors, "era", params)])
        return cls(dm, name)

    @property
    def device(self) -> Path:
        return MAPPER / self.name

    def status(self) -> EraStatus:
        return EraStatus.parse(self.dm.status(self.name)[0].params)

    def checkpoint(self) -> int:
        """Cut an era: the writes so far are archived; returns the new current era."""
        self.dm.message(self.name, "checkpoint")
        return self.status().current_era

    def take_snapshot(self) -> None:
        """Copy the metadata's current state for reading while the target runs (cuts an era)."""
        self.dm.message(self.name, "take_metadata_snap")

    def drop_snapshot(self) -> None:
        self.dm.message(self.name, "drop_metadata_snap")

    def suspend(self) -> None:
        """Queue new I/O, finish what is in flight, archive the era, commit the metadata."""
        self.dm.suspend(self.name)

    def resume(self) -> None:
        """Let I/O through again; this starts a new era."""
        self.dm.resume(self.name)

    def remove(self) -> None:
        self.dm.remove(self.name)
