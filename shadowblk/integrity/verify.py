"""Verify a live replicated primary against one of its shadows: compare their checksum maps by
hash tree while writes continue, without false alarms for the epochs in flight.

Sources:

- the primary's map: STATE_DIR/checksums.map, written by the running `serve` (read live:
  `LiveMap`, a copy of the shared mapping's current entries);
- the shadow's map, through a `ShadowSource`: `LocalShadow` reads SHADOW_DIR/<volume>.map on
  this host and answers the compare messages from a `TreeResponder` in process (bytes
  exchanged counted as on a wire); `RemoteShadow` asks the shadow's verify port
  (`tree_service`), which snapshots its map on OPEN and answers from the snapshot;
- what is in flight: the primary's persisted record of the shadow,
  STATE_DIR/replication/shadow-<host>-<port>.lacks (+ .json, the last acknowledged epoch).
  That bitmap is a superset, at every moment, of the blocks the shadow may not have applied
  yet: a block is put in it (saved before the write is captured, when its 4 MiB chunk is not
  already covered) before the primary's map changes, and it leaves only in a save that
  follows the shadow's acknowledgement, which the shadow sends after its map has the block.
  The status file (`status.json`) says whether the shadow is streaming in sync: a shadow in a
  full sync is not comparable (its record does not list what it lacks).

One round: read the record (acked epoch, bitmap and the bitmap file's identity), snapshot both
maps, read the record again. The round is *trusted* when the record did not change meanwhile
(same acked epoch, same file): then every block that differs legitimately is in the bitmap,
and a differing block outside it is a real discrepancy. The exclusion is the union of both
readings. An untrusted round (the record was saved during it) finds nothing: its differing
blocks are deferred and rechecked.

`verify` runs a full compare, then rechecks the deferred blocks (only their leaves) once the
shadow acknowledged the epoch that was last cut when the compare began, until they are clean,
confirmed different in a trusted round, or the recheck time is up (then they are reported as
still in flight: not known bad).
"""

from __future__ import annotations

import json
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shadowblk.delta.primary_state import shadow_name
from shadowblk.integrity.checksum_map import LiveMap, MapInvalidError
from shadowblk.integrity.discrepancies import Discrepancy, DiscrepancyLog
from shadowblk.integrity.hash_tree import HashTree
from shadowblk.integrity.tree_client import TreeClient
from shadowblk.integrity.tree_compare import (
    CompareResult,
    GeometryMismatch,
    ProtocolError,
    Send,
    TreeResponder,
    compare,
    recheck,
)
from shadowblk.integrity.tree_wire import WireError
from shadowblk.nbd.checksums import MAP_FILE
from shadowblk.nbd.replication import StatusUnavailable, read_status
from shadowblk.tracking.bitmap import DirtyBitmap


class NotComparable(Exception):
    """The two sides cannot be compared now (no map, shadow not in sync, unknown shadow)."""


@dataclass
class _Record:
    acked: int
    identity: tuple[int, int, int, int]
    lacks: DirtyBitmap


@dataclass
class Round:
    differing: list[int]  # byte offsets that differ while not in flight (trusted rounds only)
    deferred: list[int]  # byte offsets that differ but may be in flight
    trusted: bool
    bytes_exchanged: int
    round_trips: int
    exclude: DirtyBitmap  # what was in flight during the round


@dataclass
class VerifyReport:
    volume: str
    shadow: str
    block_size: int = 0
    rounds: int = 0
    untrusted_rounds: int = 0
    bytes_exchanged: int = 0  # tree-compare messages
    wire_bytes: int = 0  # bytes on the socket to the verify port (0 for a local shadow)
    round_trips: int = 0
    differing: list[int] = field(default_factory=list)  # byte offsets, real discrepancies
    in_flight: int = 0  # blocks in flight at the first compare (skipped or deferred)
    deferred: int = 0  # of those, blocks seen to differ
    resolved: int = 0  # blocks in flight rechecked once quiet and found equal
    still_in_flight: list[int] = field(default_factory=list)  # in flight until the end
    primary_epoch: int = 0
    acked_epoch: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["differing_blocks"] = [o // self.block_size for o in self.differing]
        return data


def recorded_shadow(state_dir: Path) -> str:
    """HOST:PORT of the primary's only shadow (as given to `serve --shadow`)."""
    folder = state_dir / "replication"
    records = sorted(folder.glob("shadow-*.json"))
    if len(records) != 1:
        raise NotComparable(f"{len(records)} shadows recorded in {folder}: name one with --shadow")
    host, _, port = records[0].name.removeprefix("shadow-").removesuffix(".json").rpartition("-")
    return f"{host}:{port}"


class ShadowSource(Protocol):
    """Where a shadow's map is compared from: `snapshot` fixes its state for one round."""

    wire_bytes: int  # bytes on the network so far (0 for a local shadow)

    def snapshot(self, volume_id: str) -> Send: ...

    def close(self) -> None: ...


class LocalShadow:
    """A shadow whose data folder is on this host: its map is read from the file."""

    wire_bytes = 0

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def snapshot(self, volume_id: str) -> Send:
        try:
            theirs = LiveMap(self.data_dir / f"{volume_id}.map")
        except MapInvalidError as exc:
            raise NotComparable(str(exc)) from None
        return TreeResponder(HashTree(theirs.crcs, theirs.block_size)).handle

    def close(self) -> None:
        """Nothing is held between rounds."""


class RemoteShadow:
    """A shadow reached at its verify port (`shadowblk shadow --verify-listen`); one
    connection, opened at the first snapshot and kept for the following rounds."""

    def __init__(self, host: str, port: int, key: bytes | None, tls: ssl.SSLContext | None) -> None:
        self.host, self.port, self.key, self.tls = host, port, key, tls
        self.client: TreeClient | None = None
        self._counted = 0  # bytes of connections already closed

    @property
    def wire_bytes(self) -> int:
        live = self.client.bytes_sent + self.client.bytes_received if self.client else 0
        return self._counted + live

    def snapshot(self, volume_id: str) -> Send:
        """OPEN on the kept connection, or on a new one if that fails (the shadow closes idle
        connections, e.g. between compares of `--repeat N --interval S`)."""
        error: Exception | None = None
        for fresh in (True,) if self.client is None else (False, True):
            try:
                if fresh:
                    self.close()
                    self.client = TreeClient(self.host, self.port, self.key, self.tls)
                assert self.client is not None
                self.client.open(volume_id)
                return self._send
            except (OSError, WireError) as exc:
                error = exc
        self.close()
        raise NotComparable(f"shadow verify port {self.host}:{self.port}: {error}") from None

    def _send(self, request: bytes) -> bytes:
        """The client's send; a broken connection ends the compare as a ProtocolError and the
        next snapshot connects again."""
        try:
            assert self.client is not None
            return self.client.send(request)
        except (OSError, WireError) as exc:
            self.close()
            raise ProtocolError(f"verify port {self.host}:{self.port}: {exc}") from None

    def close(self) -> None:
        if self.client is not None:
            self._counted = self.wire_bytes
            self.client.close()
            self.client = None


class Verifier:
    def __init__(
        self,
        state_dir: Path,
        source: ShadowSource,
        shadow: str | None = None,
        server: str | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.replication_dir = state_dir / "replication"
        self.server = server or os.uname().nodename
        try:
            ident = json.loads((self.replication_dir / "replicator.json").read_text())
            self.volume_id = str(ident["volume_id"])
        except (OSError, ValueError, KeyError) as exc:
            raise NotComparable(
                f"{state_dir} is not a replicated primary's state ({exc})"
            ) from None
        self.shadow_address = shadow or recorded_shadow(state_dir)
        host, _, port = self.shadow_address.rpartition(":")
        if not port.isdigit():
            raise NotComparable(f"--shadow {self.shadow_address!r} is not HOST:PORT")
        name = shadow_name(host.strip("[]"), int(port))
        self.json_path = self.replication_dir / f"shadow-{name}.json"
        self.lacks_path = self.replication_dir / f"shadow-{name}.lacks"
        self.primary_map = state_dir / MAP_FILE
        self.shadow = source
        self.block_size = 0  # the maps', known after the first round
        self._found: dict[int, tuple[int, int]] = {}  # offset -> (primary crc, shadow crc)

    # --- the primary's view of the shadow ----------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """This shadow's entry in the running primary's status (None: the primary is stopped).
        Raises NotComparable while the shadow is not streaming in sync."""
        try:
            doc = read_status(self.state_dir)
        except StatusUnavailable:
            return None
        for entry in doc.get("shadows", []):
            if entry.get("address") == self.shadow_address:
                if not (entry.get("connected") and entry.get("in_sync")):
                    raise NotComparable(
                        f"shadow {self.shadow_address} is not in sync (phase {entry.get('phase')})"
                    )
                return {**entry, "last_cut_epoch": doc.get("last_cut_epoch", 0)}
        raise NotComparable(f"the primary does not replicate to {self.shadow_address}")

    def _record(self) -> _Record:
        for _ in range(50):
            try:
                acked = int(json.loads(self.json_path.read_text())["acked"])
                before = os.stat(self.lacks_path)
                lacks = DirtyBitmap.load(self.lacks_path)
                after = os.stat(self.lacks_path)
            except FileNotFoundError:
                time.sleep(0.01)  # replaced while read: read again
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise NotComparable(f"{self.json_path}: unreadable ({exc})") from None
            ident = (before.st_ino, before.st_mtime_ns, before.st_ctime_ns, before.st_size)
            if ident == (after.st_ino, after.st_mtime_ns, after.st_ctime_ns, after.st_size):
                if acked == 0:
                    raise NotComparable(f"shadow {self.shadow_address} has no acknowledged epoch")
                return _Record(acked, ident, lacks)
        raise NotComparable(f"{self.lacks_path} keeps changing while read")

    # --- one round ---------------------------------------------------------------------------

    def round(self, offsets: list[int] | None = None) -> Round:
        """Compare everything (OFFSETS None) or recheck the leaves holding OFFSETS."""
        self.status()
        first = self._record()
        try:
            ours = LiveMap(self.primary_map)
        except MapInvalidError as exc:
            raise NotComparable(str(exc)) from None
        send = self.shadow.snapshot(self.volume_id)
        last = self._record()
        self.status()
        trusted = first.acked == last.acked and first.identity == last.identity
        exclude = first.lacks.copy()
        exclude.union(last.lacks)
        local = HashTree(ours.crcs, ours.block_size)
        try:
            result: CompareResult = (
                compare(local, send, exclude)
                if offsets is None
                else recheck(local, send, offsets, exclude)
            )
        except GeometryMismatch as exc:
            raise NotComparable(f"maps of different volumes: {exc}") from None
        except ProtocolError as exc:
            raise NotComparable(f"compare with {self.shadow_address} failed: {exc}") from None
        self.block_size = ours.block_size
        if trusted:
            for offset in result.differing:
                self._found[offset] = (
                    int(ours.crcs[offset // ours.block_size]),
                    result.peer_crcs[offset],
                )
            differing, deferred = result.differing, result.deferred
        else:
            differing, deferred = [], sorted(result.deferred + result.differing)
        return Round(
            differing, deferred, trusted, result.bytes_exchanged, result.round_trips, exclude
        )

    # --- a verify ----------------------------------------------------------------------------

    def verify(
        self, recheck_timeout: float = 10.0, log: DiscrepancyLog | None = None
    ) -> VerifyReport:
        start = time.monotonic()
        report = VerifyReport(self.volume_id, self.shadow_address)
        status = self.status()
        cut = status["last_cut_epoch"] if status else 0
        wire_before = self.shadow.wire_bytes
        first = self._count(report, self.round())
        bs = report.block_size = self.block_size
        found = set(first.differing)
        # every block in flight is rechecked once acknowledged, whether or not it was seen to
        # differ (a wholly excluded subtree is not even descended)
        pending = set(first.deferred) | {
            block
            for offset, length in first.exclude.extents()
            for block in range(offset, offset + length, bs)
        }
        report.in_flight = len(pending)
        report.deferred = len(first.deferred)
        deadline = time.monotonic() + recheck_timeout
        while pending and time.monotonic() < deadline:
            self._wait_acked(cut, deadline)
            again = self._count(report, self.round(sorted(pending)))
            found |= set(again.differing)
            still = {o for o in pending if again.exclude.test(o)} | set(again.deferred)
            report.resolved += len(pending - still - found)
            pending = still - found
            if pending:
                time.sleep(0.05)
        report.differing = sorted(found)
        report.still_in_flight = sorted(pending)
        status = self.status()
        report.primary_epoch = status["last_cut_epoch"] if status else 0
        report.acked_epoch = status["acked_epoch"] if status else self._record().acked
        report.wire_bytes = self.shadow.wire_bytes - wire_before
        report.seconds = round(time.monotonic() - start, 3)
        if log is not None and found:
            log.append(self._discrepancies(report))
        return report

    def _count(self, report: VerifyReport, rnd: Round) -> Round:
        report.rounds += 1
        report.untrusted_rounds += not rnd.trusted
        report.bytes_exchanged += rnd.bytes_exchanged
        report.round_trips += rnd.round_trips
        return rnd

    def _wait_acked(self, epoch: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            status = self.status()
            if status is None or status["acked_epoch"] >= epoch:
                return
            time.sleep(0.1)

    def _discrepancies(self, report: VerifyReport) -> list[Discrepancy]:
        return [
            Discrepancy(
                server=self.server,
                volume=self.volume_id,
                offset=offset,
                block_size=report.block_size,
                side="shadow",
                kind="diverged",
                repaired=False,
                expected_crc=self._found[offset][0],
                actual_crc=self._found[offset][1],
                detail=(
                    f"verify: shadow {self.shadow_address} map differs from the primary's while "
                    "the block was not in flight (scrub decides who holds the truth)"
                ),
            )
            for offset in report.differing
        ]
