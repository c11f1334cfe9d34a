"""In-band write tracking for a served volume: the dirty bitmap, its durable state, observers.

Durability rule (the same promise as dm-era and DRBD's activity log): a write is issued only
after its region is recorded in the activity log, so after a crash the dirty set recovered as
saved bitmap ∪ every logged region can over-report but never forget a written block. The full
bitmap is saved at every checkpoint (periodic and at a clean stop); a clean stop loses nothing.

State folder: `volume.json` (geometry), `dirty.bitmap` (DirtyBitmap.save format), `hot-*.log`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from shadowblk._native.mutex import Mutex
from shadowblk.tracking.activity_log import (
    ActivityLog,
    ActivityLogCorruptError,
    generations,
    log_path,
    read_regions,
)
from shadowblk.tracking.bitmap import BitmapCorruptError, DirtyBitmap

log = logging.getLogger(__name__)

DEFAULT_REGION_SIZE = 4 << 20
GEOMETRY_FILE = "volume.json"
BITMAP_FILE = "dirty.bitmap"


class StateError(Exception):
    """The state folder cannot be used for this volume (missing, foreign, other geometry)."""


class WriteObserver(Protocol):
    """What the shadows layer plugs into the server. Every call runs on a thread of the
    connection with the GIL, before the volume is touched (after FLUSH's fdatasync for
    on_flush), and may block it: that is how back-pressure and the `sync` mode hold a reply
    back. Raising fails the request (an OSError's errno goes to the client, else EIO) and
    leaves the volume untouched."""

    def on_write(self, offset: int, data: bytes) -> None:
        """A WRITE of DATA at OFFSET is about to be issued (the data is needed: an epoch holds
        a copy, so that it stays a point in time while the volume moves on)."""

    def on_zero(self, offset: int, length: int) -> None:
        """A WRITE_ZEROES of this range is about to be issued."""

    def on_trim(self, offset: int, length: int) -> None:
        """A TRIM of this range is about to be issued."""

    def on_flush(self) -> None:
        """Every write acknowledged so far is durable on the volume; the FLUSH reply waits for
        this to return (the natural place to cut an epoch)."""


class BatchWriteObserver(WriteObserver, Protocol):
    """An observer that may also take a batch of WRITEs in one call (optional: without
    `on_writes` the tracker calls `on_write` for each). A batch comes from the native loop
    before any of its writes is issued, so an observer that reads the volume (to complete a
    partial block) must lay the batch's earlier writes over what it reads."""

    def on_writes(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """The WRITEs (offset, data), in the order they will be issued; raising fails them all."""


def read_geometry(state_dir: Path) -> dict[str, int]:
    path = state_dir / GEOMETRY_FILE
    try:
        geometry = json.loads(path.read_text())
        return {k: int(geometry[k]) for k in ("size", "block_size", "region_size")}
    except FileNotFoundError:
        raise StateError(f"{state_dir} is not a shadowblk tracking state folder") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path}: unreadable ({exc})") from None


def recover_dirty(state_dir: Path) -> tuple[DirtyBitmap, list[str]]:
    """The dirty set the state folder proves: saved bitmap ∪ logged regions. Damaged state is
    never trusted: it makes the whole volume dirty (over-report), with a note saying why."""
    geometry = read_geometry(state_dir)
    for _ in range(10):
        try:
            return _read_state(state_dir, geometry)
        except FileNotFoundError:
            continue  # a live server retired a log while we read: read again
    return _read_state(state_dir, geometry)


def _read_state(state_dir: Path, geometry: dict[str, int]) -> tuple[DirtyBitmap, list[str]]:
    size, block_size, region_size = (
        geometry["size"],
        geometry["block_size"],
        geometry["region_size"],
    )
    notes: list[str] = []
    bitmap = DirtyBitmap(size, block_size)
    saved = state_dir / BITMAP_FILE
    logs = generations(state_dir)
    try:
        if saved.exists():
            loaded = DirtyBitmap.load(saved)
            if (loaded.size, loaded.block_size) != (size, block_size):
                raise BitmapCorruptError(f"{saved}: geometry differs from {GEOMETRY_FILE}")
            bitmap.union(loaded)
        for generation in logs:
            for region in read_regions(log_path(state_dir, generation)):
                start = region * region_size
                if start >= size:
                    raise ActivityLogCorruptError(f"region {region} lies beyond the volume")
                bitmap.mark(start, min(region_size, size - start))
    except FileNotFoundError:
        raise
    except (BitmapCorruptError, ActivityLogCorruptError, OSError) as exc:
        notes.append(f"tracking state damaged, reporting the whole volume dirty: {exc}")
        bitmap.mark(0, size)
    return bitmap, notes


# per-region state in WriteTracker.hot
COLD = 0  # not in the current activity log: the first write must record it
CARRIED = 1  # in the log, carried over from the previous interval
WRITTEN = 2  # in the log and written during the current interval
PENDING = 3  # being recorded by before_writes (not durable yet): a write into it must wait
AHEAD = 4  # like CARRIED, and the first write into it has the next window logged in the background
_AGE = bytes.maketrans(
    bytes([COLD, CARRIED, WRITTEN, PENDING, AHEAD]), bytes([COLD, COLD, CARRIED, PENDING, COLD])
)
# A sequential writer entering a region not yet logged (the one before it written in this
# interval) gets the next LOG_AHEAD - 1 regions logged with it, as CARRIED (logged, not yet
# written): one fdatasync per 32 MiB of a sequential pass instead of one per 4 MiB. A region so
# logged and then not written retires at the next checkpoint; a crash before that over-reports it.
# The first region logged ahead is AHEAD: the write that enters it has the tracker's prelogger
# thread log the LOG_AHEAD regions after the logged run, as the writer goes on, so a sequential
# pass waits for the log's fdatasync once at its start, not every 32 MiB (under heavy page-cache
# writeback one such fdatasync took up to tens of ms, the whole connection waiting: 2026-11-28).
LOG_AHEAD = 8


class WriteTracker:
    """Marks every write before it is issued and keeps that knowledge durable in STATE_DIR.

    `hot` (one byte per region, never resized), `region_shift`, `lock` and `bitmap` are also
    used by the Cython transmission loop, which marks writes into already-logged regions
    itself, without the GIL, under `lock` (a native Mutex: every use of `hot` and `bitmap`
    holds it, not the GIL), and calls before_writes() only when a region must be logged first
    (COLD) or is being logged (PENDING). The log's append and fdatasync hold `_log_lock`, not
    `lock`, so writes into logged regions go on while a new region is made durable.
    Whichever loop serves a write holds `ordering` from the observer call (on_write, or
    observe_writes() for a native batch) through the volume change, so that observers see
    overlapping writes of different connections in the order the volume does.
    """

    def __init__(
        self,
        state_dir: Path,
        size: int,
        block_size: int = 4096,
        region_size: int = DEFAULT_REGION_SIZE,
        save_interval: float = 30.0,
    ) -> None:
        if region_size < block_size or region_size & (region_size - 1):
            raise ValueError(f"region size {region_size} is not a power of two >= the block size")
        self.state_dir = state_dir
        self.region_size = region_size
        self.region_shift = region_size.bit_length() - 1
        self.observers: list[WriteObserver] = []
        self.ordering = Mutex()  # the native loop takes and lets it go without the GIL
        state_dir.mkdir(parents=True, exist_ok=True)
        geometry = {"size": size, "block_size": block_size, "region_size": region_size}
        if (state_dir / GEOMETRY_FILE).exists():
            found = read_geometry(state_dir)
            if found != geometry:
                raise StateError(
                    f"{state_dir} tracks a volume with geometry {found}, not {geometry}"
                )
            self.bitmap, notes = recover_dirty(state_dir)
            for note in notes:
                log.warning("%s", note)
        else:
            DirtyBitmap(size, block_size)  # validates the geometry before anything is written
            (state_dir / GEOMETRY_FILE).write_text(json.dumps(geometry))
            self.bitmap = DirtyBitmap(size, block_size)
        self.lock = Mutex()
        self._checkpoint_lock = threading.Lock()
        self._log_lock = threading.Lock()  # the activity log's appends and rotation; before `lock`
        self.hot = bytearray(((size - 1) >> self.region_shift) + 1)
        self._log = ActivityLog(state_dir)
        self.checkpoint(force=True)
        self._stop = threading.Event()
        self._saver = threading.Thread(
            target=self._save_loop, args=(save_interval,), name="tracking-saver", daemon=True
        )
        self._saver.start()
        self._wanted: list[int] = []  # AHEAD regions entered, for the prelogger; under _want
        self._want = threading.Condition()
        self._prelogger = threading.Thread(
            target=self._prelog_loop, name="tracking-prelog", daemon=True
        )
        self._prelogger.start()

    def before_writes(self, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        """Record and mark a batch of ranges about to be written; returns once that is durable."""
        shift = self.region_shift
        mark = self.bitmap.mark
        hot = self.hot
        unlogged: set[int] = set()
        entered: list[int] = []
        with self.lock:
            for offset, length in zip(offsets, lengths, strict=True):
                for region in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
                    if hot[region] in (COLD, PENDING):
                        unlogged.add(region)
                        hot[region] = PENDING
                    else:
                        if hot[region] == AHEAD:
                            entered.append(region)
                        hot[region] = WRITTEN
                mark(offset, length)
        if entered:
            with self._want:
                self._wanted.extend(entered)
                self._want.notify()
        if not unlogged:
            return
        # the log's fdatasync runs without `lock`: writes into logged regions go on meanwhile
        with self._log_lock:
            with self.lock:
                # the others were logged meanwhile by another batch that wanted them too
                new = sorted(r for r in unlogged if hot[r] in (COLD, PENDING))
                for region in unlogged.difference(new):
                    hot[region] = WRITTEN
                ahead = self._ahead(new)
                for region in new + ahead:
                    hot[region] = PENDING
            if new:
                try:
                    self._log.record(new + ahead)
                except BaseException:
                    with self.lock:  # not logged: the next write into them tries again
                        for region in new + ahead:
                            hot[region] = COLD
                    raise
            with self.lock:
                for region in new:
                    hot[region] = WRITTEN
                for region in ahead:
                    hot[region] = CARRIED
                if ahead:
                    hot[ahead[0]] = AHEAD

    def _prelog_loop(self) -> None:
        """The prelogger thread: logs the window after each AHEAD region a writer entered."""
        while not self._stop.is_set():
            with self._want:
                self._want.wait_for(lambda: self._wanted or self._stop.is_set(), timeout=0.5)
                wanted, self._wanted = self._wanted, []
            for region in wanted:
                try:
                    self._log_window_after(region)
                except OSError:
                    log.exception("logging regions ahead failed; the writes will log them")

    def _log_window_after(self, region: int) -> None:
        """Log the LOG_AHEAD regions after the logged run that REGION is in (those still COLD),
        the first one AHEAD: durable before any of them counts as logged."""
        hot = self.hot
        with self._log_lock:
            if self._stop.is_set():
                return
            with self.lock:
                end = region
                while end + 1 < len(hot) and end - region < 2 * LOG_AHEAD and hot[end + 1] != COLD:
                    end += 1
                stop = min(end + 1 + LOG_AHEAD, len(hot))
                window = [r for r in range(end + 1, stop) if hot[r] == COLD]
                for r in window:
                    hot[r] = PENDING
            if not window:
                return
            try:
                self._log.record(window)
            except BaseException:
                with self.lock:
                    for r in window:
                        if hot[r] == PENDING:
                            hot[r] = COLD
                raise
            with self.lock:  # a write waiting for one of them holds no claim on it: all logged
                for r in window:
                    if hot[r] == PENDING:
                        hot[r] = CARRIED
                if hot[window[0]] == CARRIED:
                    hot[window[0]] = AHEAD

    def _ahead(self, new: list[int]) -> list[int]:
        """The COLD regions to log ahead of the sequential runs among NEW, the regions a batch
        is about to log (see LOG_AHEAD); call with `lock` held."""
        hot = self.hot
        ahead: list[int] = []
        for region in new:
            if region == 0 or (hot[region - 1] != WRITTEN and region - 1 not in new):
                continue
            for nxt in range(region + 1, min(region + LOG_AHEAD, len(hot))):
                if hot[nxt] == COLD and nxt not in ahead:
                    ahead.append(nxt)
        return ahead

    def before_write(self, offset: int, data: bytes) -> None:
        """Track a WRITE and show it to the observers (call with `ordering` held)."""
        self.before_writes([offset], [len(data)])
        for observer in self.observers:
            observer.on_write(offset, data)

    def observe_writes(self, writes: Sequence[tuple[int, bytes]]) -> tuple[int, Exception | None]:
        """Show a batch of WRITEs, already tracked, to the observers (call with `ordering` held,
        before any is issued): each observer in turn gets the writes the ones before it
        accepted. Returns how many, from the first, every observer accepted, and the refusal
        that stopped the rest (the native loop issues the accepted ones and fails the rest with
        that error, as the Python loop fails a refused write)."""
        accepted, refusal = len(writes), None
        for observer in self.observers:
            done = 0
            try:
                batch = getattr(observer, "on_writes", None)
                if batch is not None:
                    batch(writes[:accepted])
                    done = accepted
                else:
                    for offset, data in writes[:accepted]:
                        observer.on_write(offset, data)
                        done += 1
            except Exception as exc:
                log.error("write tracking failed, refusing the write: %s", exc)
                accepted, refusal = done, exc
        return accepted, refusal

    def before_zero(self, offset: int, length: int, trim: bool) -> None:
        """Track a WRITE_ZEROES (or a TRIM) and show it to the observers."""
        self.before_writes([offset], [length])
        for observer in self.observers:
            if trim:
                observer.on_trim(offset, length)
            else:
                observer.on_zero(offset, length)

    def after_flush(self) -> None:
        for observer in self.observers:
            observer.on_flush()

    def checkpoint(self, final: bool = False, force: bool = False) -> None:
        """Save the bitmap and retire the activity log it now covers. Regions written in the
        interval that ends now stay logged (the new log starts with them), the others retire:
        steady writes never pay the log's fsync again. FINAL (a clean stop, no write can
        follow) carries nothing, so the saved state is exact."""
        with self._checkpoint_lock:
            with self._log_lock, self.lock:  # no record is half way while the log rotates
                if WRITTEN not in self.hot and not force:
                    return
                snapshot = self.bitmap.copy()
                flags = np.frombuffer(self.hot, dtype=np.uint8)
                carry = [] if final else np.flatnonzero(flags == WRITTEN).tolist()
                del flags  # a live export of the bytearray would forbid changing it
                superseded = self._log.rotate(carry)
                self.hot[:] = bytes(len(self.hot)) if final else self.hot.translate(_AGE)
            snapshot.save(self.state_dir / BITMAP_FILE)
            self._log.drop(superseded)

    def _save_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.checkpoint()
            except OSError:
                log.exception("periodic save of the tracking state failed; the log still holds it")

    def close(self) -> None:
        """Final checkpoint at a clean stop: afterwards the bitmap file alone is exact."""
        self._stop.set()
        with self._want:
            self._want.notify()
        self._saver.join()
        self._prelogger.join()
        self.checkpoint(final=True, force=True)
        self._log.close()
