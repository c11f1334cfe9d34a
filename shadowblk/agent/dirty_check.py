"""The agent's side of the checksum compare before a promotion (docs/switchover.md): the crc32c
of the blocks dirtied since the last verify, on the fenced old primary and on the shadow about
to be promoted, and the repair of the shadow's blocks that do not match.

The blocks dirtied since the last verify are those whose entry in the primary's checksum map
differs from the map saved when this copy was last verified (DATA_DIR/verified/VOLUME.npz: the
promoted shadow's map as the compare found it, kept with the generation the promotion started).
A primary with no such map of its current generation (created here, or promoted in an
emergency, without a compare) compares every block written since the volume was created: the
blocks whose entry is not the all-zero block's.

The old primary answers its map's crcs of those blocks twice: before the VM's pause (still
serving; the map it answered is kept, DATA_DIR/verified/VOLUME.seen.npy) and in the pause
(fenced: they no longer change), then only for the blocks changed since the kept map; the
shadow answers the crcs of its image's data for the same blocks (its map is not enough: a
block that rotted on its disk, or an apply that never reached it, still has the right entry).
Bitmaps and crcs travel as base64 (zlib-compressed bitmap: a few bytes for a quiet volume).
"""

from __future__ import annotations

import base64
import contextlib
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from shadowblk.integrity.blockcrc import block_crc32c
from shadowblk.integrity.checksum_map import (
    HEADER_BYTES,
    ChecksumMap,
    LiveMap,
    MapBusyError,
    MapInvalidError,
    zero_block_crc,
)
from shadowblk.integrity.discrepancies import Discrepancy, DiscrepancyLog

MAX_RUN = 1024  # blocks read at once from an image


class CheckError(ValueError):
    """This copy cannot answer the compare (no map, a block out of range, bad data)."""


def pack(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<u4").tobytes()).decode()


def unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<u4")


def pack_blocks(blocks: np.ndarray, total: int) -> str:
    """The block numbers BLOCKS of a volume of TOTAL blocks as a compressed bitmap."""
    mask = np.zeros(total, dtype=bool)
    mask[blocks] = True
    return base64.b64encode(zlib.compress(np.packbits(mask).tobytes())).decode()


def unpack_blocks(text: str, total: int) -> np.ndarray:
    try:
        bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    except (ValueError, zlib.error) as err:
        raise CheckError(f"blocks: not a compressed bitmap ({err})") from None
    if len(bits) != -(-total // 8):
        raise CheckError(f"blocks: a bitmap of {len(bits)} bytes for {total} blocks")
    return np.flatnonzero(np.unpackbits(bits)[:total])


def _baseline(data_dir: Path, name: str) -> Path:
    return data_dir / "verified" / f"{name}.npz"


def _live(path: Path) -> LiveMap:
    try:
        return LiveMap(path)
    except MapInvalidError as err:
        raise CheckError(f"no checksum map to compare: {err}") from None


def _seen(data_dir: Path, name: str) -> Path:
    return data_dir / "verified" / f"{name}.seen.npy"


def primary_dirty(
    data_dir: Path, name: str, generation: int, keep: bool = False, since_seen: bool = False
) -> dict[str, Any]:
    """The primary NAME's dirty blocks since its last verify and their map crcs. KEEP: the map
    as answered is kept (the compare before the pause, writes still flowing); SINCE_SEEN: only
    the blocks whose entry changed since that kept map (the compare in the pause, fenced)."""
    live = _live(data_dir / "primaries" / f"{name}.state" / "checksums.map")
    crcs = live.crcs  # read once (a copy): the entries still change while the primary serves
    if since_seen:
        try:
            base = np.load(_seen(data_dir, name))
        except (OSError, ValueError) as err:
            raise CheckError(f"no map kept by an earlier compare: {err}") from None
        if len(base) != live.blocks:
            raise CheckError(f"the kept map has {len(base)} entries, the volume {live.blocks}")
        scope = "since-seen"
    else:
        base = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = np.load(_baseline(data_dir, name))
            if int(saved["generation"]) == generation and len(saved["crcs"]) == live.blocks:
                base = saved["crcs"]
        scope = "since-verify"
        if base is None:
            scope, base = "since-created", np.full(live.blocks, zero_block_crc(live.block_size))
    if keep:
        path = _seen(data_dir, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".tmp.npy"), crcs)
        os.replace(path.with_suffix(".tmp.npy"), path)
    dirty = np.flatnonzero(crcs != base)
    return {
        "scope": scope,
        "block_size": live.block_size,
        "total": live.blocks,
        "count": len(dirty),
        "blocks": pack_blocks(dirty, live.blocks),
        "crcs": pack(crcs[dirty]),
    }


def _runs(blocks: np.ndarray) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive BLOCKS (sorted), at most MAX_RUN long."""
    if not len(blocks):
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    ends = np.concatenate((breaks, [len(blocks)])).tolist()
    return [
        (int(blocks[first]), min(MAX_RUN, end - first))
        for start, end in zip(starts, ends, strict=True)
        for first in range(start, end, MAX_RUN)
    ]


def data_crcs(image: Path, blocks: np.ndarray, block_size: int) -> np.ndarray:
    """crc32c of the data of BLOCKS of IMAGE (the last block zero-padded, as in the maps)."""
    out = np.empty(len(blocks), dtype="<u4")
    fd = os.open(image, os.O_RDONLY)
    try:
        i = 0
        for first, count in _runs(blocks):
            data = os.pread(fd, count * block_size, first * block_size)
            data += bytes(count * block_size - len(data))
            out[i : i + count] = block_crc32c(data, block_size)
            i += count
    finally:
        os.close(fd)
    return out


def shadow_crcs(data_dir: Path, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """The data crcs of the blocks the body names, from the shadow's image; with `generation`,
    the shadow's map is kept as the verified one of that generation (the promotion's)."""
    shadows = data_dir / "shadows"
    live = _live(shadows / f"{name}.map")
    blocks = unpack_blocks(str(body["blocks"]), live.blocks)
    crcs = data_crcs(shadows / f"{name}.img", blocks, live.block_size)
    if "generation" in body:
        save_baseline(data_dir, name, live.crcs, int(body["generation"]))
    return {"count": len(blocks), "crcs": pack(crcs)}


def save_baseline(data_dir: Path, name: str, crcs: np.ndarray, generation: int) -> None:
    path = _baseline(data_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, crcs=crcs, generation=np.int64(generation))
    os.replace(tmp, path)


def read_blocks(data_dir: Path, name: str, blocks: list[int]) -> dict[str, Any]:
    """The fenced primary's data of BLOCKS, with the crc of that data (the manager compares it
    with this map's entry and the shadow's data to tell which copy is wrong)."""
    state = data_dir / "primaries" / f"{name}.state"
    live = _live(state / "checksums.map")
    wanted = np.array(sorted(set(blocks)), dtype=np.int64)
    if len(wanted) and (wanted[0] < 0 or wanted[-1] >= live.blocks):
        raise CheckError(f"blocks outside the volume's {live.blocks}")
    image = data_dir / "primaries" / f"{name}.img"
    bs = live.block_size
    fd = os.open(image, os.O_RDONLY)
    try:
        data = [os.pread(fd, bs, b * bs).ljust(bs, b"\0") for b in wanted.tolist()]
    finally:
        os.close(fd)
    crcs = block_crc32c(b"".join(data), bs) if data else np.empty(0, dtype="<u4")
    return {
        "blocks": wanted.tolist(),
        "crcs": pack(crcs),
        "data": base64.b64encode(b"".join(data)).decode(),
    }


def repair(data_dir: Path, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """Write the old primary's BLOCKS into the shadow's image (durably) and their crcs into its
    map and its verified map; the shadow server is idle (its primary is fenced)."""
    shadows = data_dir / "shadows"
    blocks = [int(b) for b in body["blocks"]]
    data = base64.b64decode(str(body["data"]))
    live = _live(shadows / f"{name}.map")
    bs = live.block_size
    if len(data) != len(blocks) * bs or any(not 0 <= b < live.blocks for b in blocks):
        raise CheckError(f"repair: {len(data)} bytes for {len(blocks)} blocks of {bs}")
    image = shadows / f"{name}.img"
    size = image.stat().st_size
    fd = os.open(image, os.O_WRONLY)
    try:
        for i, b in enumerate(blocks):
            chunk = data[i * bs : (i + 1) * bs][: max(0, size - b * bs)]
            if os.pwrite(fd, chunk, b * bs) != len(chunk):
                raise CheckError(f"repair: short write at block {b}")
        os.fsync(fd)
    finally:
        os.close(fd)
    crcs = block_crc32c(data, bs) if blocks else np.empty(0, dtype="<u4")
    _store_crcs(shadows / f"{name}.map", blocks, crcs, live.blocks)
    path = _baseline(data_dir, name)
    with contextlib.suppress(OSError, ValueError, KeyError):
        saved = np.load(path)
        base = saved["crcs"].copy()
        base[blocks] = crcs
        save_baseline(data_dir, name, base, int(saved["generation"]))
    return {"repaired": len(blocks)}


def _store_crcs(path: Path, blocks: list[int], crcs: np.ndarray, total: int) -> None:
    """The repaired blocks' crcs into the shadow's map. Handed over (no shadow server holds
    it, a planned switchover's pause): opened as its writer, so that its close stamps the
    header with the entries' new checksum, else the new primary would distrust the map and
    rebuild it from the whole image. Held by the shadow server: through a mapping of our own,
    which the server's mapping sees at once and its close stamps."""
    try:
        cmap = ChecksumMap.load(path, writable=True)
    except (MapBusyError, MapInvalidError):  # held; or distrusted already: rebuilt anyway
        entries = np.memmap(path, dtype="<u4", mode="r+", offset=HEADER_BYTES, shape=(total,))
        entries[blocks] = crcs
        entries.flush()
        del entries
        return
    with cmap:
        bs = cmap.block_size
        cmap.put_crcs([b * bs for b in blocks], [bs] * len(blocks), crcs)


def log_discrepancies(data_dir: Path, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """Record the blocks the compare found wrong on this copy (now the primary) in its
    discrepancy log, which the agent's heartbeat counts for the failure predictor."""
    size = int(body["block_size"])
    records = [
        Discrepancy(
            server=str(d["server"]),
            volume=name,
            offset=int(d["block"]) * size,
            block_size=size,
            side=str(d["side"]),
            kind=str(d["kind"]),
            repaired=bool(d["repaired"]),
            expected_crc=int(d["expected"]),
            actual_crc=int(d["actual"]),
            detail="switchover checksum compare before the promotion",
        )
        for d in body.get("discrepancies", [])
    ]
    state = data_dir / "primaries" / f"{name}.state"
    return {"logged": DiscrepancyLog.in_state_dir(state).append(records)}
