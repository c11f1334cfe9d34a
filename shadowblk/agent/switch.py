"""A volume's files changing role at a switchover, on one server.

Promotion turns the shadow's image into the primary's, and writes the new primary's replication
state so that it believes every shadow acknowledged the promoted shadow's last epoch E: a
shadow that is at E is then resynced from the bitmap of what is written from now on, one that is
behind gets a full sync (the replicator's own rule), never one that is ahead.

Demotion turns a stopped, fenced primary's image back into a shadow's at the epoch the new
primary (the old primary's shadow until now) acknowledged, if the old primary's record says
that shadow lacked nothing: the new primary then resyncs it from its bitmap. Otherwise the image
is dropped and the shadow server builds a new one by a full sync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from shadowblk.delta.applier import ShadowVolume
from shadowblk.delta.journal import fsync_dir, last_commit, older_format
from shadowblk.delta.primary_state import shadow_name, write_json
from shadowblk.delta.volume_state import StateFileError, VolumeState
from shadowblk.tracking.bitmap import BitmapCorruptError, DirtyBitmap

log = logging.getLogger(__name__)


class SwitchError(Exception):
    """This copy of the volume cannot take the role asked for."""


def _record(replication: Path, address: str) -> Path:
    host, _, port = address.rpartition(":")
    return replication / f"shadow-{shadow_name(host.strip('[]'), int(port))}"


# tracking/tracker.py's files, and the temporary one of a checkpoint the standby may be saving
TRACKING = re.compile(r"^(volume\.json|dirty\.bitmap|hot-\d{8}\.log|\.dirty\.bitmap\..*\.tmp)$")


def _clear(state_dir: Path, keep_tracking: bool) -> None:
    """Empty STATE_DIR; with KEEP_TRACKING, but for the write tracking state that the standby
    `serve` opened there before `go` (its syncs out of the pause; a new primary's tracking
    starts empty, and a standby tracks nothing before `go`)."""
    if not keep_tracking:
        shutil.rmtree(state_dir, ignore_errors=True)
        return
    for path in state_dir.iterdir() if state_dir.is_dir() else ():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif not TRACKING.match(path.name):
            path.unlink(missing_ok=True)


def take_shadow(
    shadows: Path,
    primaries: Path,
    name: str,
    addresses: list[str],
    keep_tracking: bool = False,
    durable: bool = True,
) -> int:
    """Make shadows/NAME the primaries/NAME image with its replication state; its epoch
    (KEEP_TRACKING: see _clear). Not DURABLE: the caller calls `settle` later (see there)."""
    try:
        state = VolumeState.load(shadows / f"{name}.state")
    except StateFileError as exc:
        raise SwitchError(f"{name}: no shadow state to promote ({exc})") from None
    epoch = state.last_applied
    if epoch == 0:
        raise SwitchError(f"{name}: the shadow never applied an epoch: it holds no valid state")
    state_dir = primaries / f"{name}.state"
    _clear(state_dir, keep_tracking)
    replication = state_dir / "replication"
    replication.mkdir(parents=True)
    identity = {"volume_id": name, "size": state.size, "block_size": state.block_size}
    for address in addresses:  # not synced (4 syncs per shadow, in the VM's pause): a record
        # lost or torn by a crash reads as unknown (acked 0, or a bitmap failing its crc), and
        # that shadow gets a full sync, never a resync from a wrong base
        base = _record(replication, address)
        DirtyBitmap(state.size, state.block_size).save(Path(f"{base}.lacks"), durable=False)
        write_json(Path(f"{base}.json"), {"acked": epoch}, durable=False)
        Path(f"{base}.al").touch()  # the empty activity log, made durable by the folder's sync
        # below (else `serve` creates it with two syncs of its own, in the pause)
    # made durable by `settle` (a torn one would keep `serve` from starting): here, or after `go`
    write_json(replication / "replicator.json", {**identity, "reserved": epoch + 1}, False)
    with contextlib.suppress(FileNotFoundError):  # the shadow server let go of it
        os.replace(shadows / f"{name}.map", state_dir / "checksums.map")
    os.replace(shadows / f"{name}.img", primaries / f"{name}.img")
    (shadows / f"{name}.state").unlink(missing_ok=True)  # now: a shadow server (re)starting
    # would load it
    if durable:
        settle(shadows, primaries, name)
    log.info("%s: shadow at epoch %d is now the primary's image", name, epoch)
    return epoch


def settle(shadows: Path, primaries: Path, name: str) -> None:
    """What `take_shadow(durable=False)` leaves for after `go`, so that its syncs overlap the
    standby's opening of the volume instead of coming before it: replicator.json and its
    folder synced (the per-shadow records' and activity logs' entries with it), the shadow's
    journal removed (freeing its blocks takes a while; without the state file, which is gone,
    nothing reads it, and a shadow created again removes a leftover). Safe because nothing can
    write to the new primary before the promotion answers: `attach` repoints only then, and
    the manager only after `promote` returned, which waits for this (I2: every acknowledged
    write is on the image, made durable by the hand-over's checkpoint). A crash before it:
    `serve` read the file already and reserves its epochs durably before the first one; a
    power loss may leave the file missing (`serve` then numbers from 1 and skips past what
    each shadow applied, with full syncs as the records are not durable either) or torn (the
    case the sync is for: no worse than a crash in `take_shadow` before)."""
    replication = primaries / f"{name}.state" / "replication"
    fd = os.open(replication / "replicator.json", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(replication)
    (shadows / f"{name}.journal").unlink(missing_ok=True)


def give_back(primaries: Path, shadows: Path, name: str, new_primary: str, generation: int) -> str:
    """Make the stopped primaries/NAME a shadow again: 'resync' (kept at the epoch NEW_PRIMARY
    acknowledged) or 'full-sync' (dropped: the old primary had writes it never received)."""
    state_dir = primaries / f"{name}.state"
    base = _record(state_dir / "replication", new_primary)
    try:
        acked = int(json.loads(Path(f"{base}.json").read_text())["acked"])
        lacks = DirtyBitmap.load(Path(f"{base}.lacks"))
    except (OSError, ValueError, KeyError, TypeError, BitmapCorruptError):
        acked, lacks = 0, None
    hot = Path(f"{base}.al")  # chunks being written when it stopped (delta/primary_state.py)
    if hot.exists() and hot.stat().st_size:
        acked = 0
    image = primaries / f"{name}.img"
    for suffix in (".state", ".journal", ".map", ".img"):
        (shadows / f"{name}{suffix}").unlink(missing_ok=True)
    mode = "full-sync"
    if acked > 0 and lacks is not None and lacks.count() == 0 and image.exists():
        with contextlib.suppress(FileNotFoundError):
            os.replace(state_dir / "checksums.map", shadows / f"{name}.map")
        os.replace(image, shadows / f"{name}.img")
        VolumeState(name, lacks.size, lacks.block_size, generation, acked).save(
            shadows / f"{name}.state"
        )
        mode = "resync"
    image.unlink(missing_ok=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    log.info("%s: the old primary is a shadow again (%s, epoch %d)", name, mode, acked)
    return mode


def recover(shadows: Path, name: str) -> None:
    """Finish an epoch the stopped shadow server had committed but not applied (or drop an
    incomplete one), as its own start would. A journal that commits nothing past the state
    (the shadow server's hand-over checkpointed) is left as it is: its records are ignored at
    any later load, and `take_shadow` removes it (not reset first: a direct write in the VM's
    pause)."""
    try:
        state = VolumeState.load(shadows / f"{name}.state")
    except StateFileError as exc:
        raise SwitchError(f"{name}: no shadow state to promote ({exc})") from None
    journal = shadows / f"{name}.journal"
    if not older_format(journal):  # an older one: ShadowVolume.recover says what to do
        found = last_commit(journal)
        if found is None or found[0] <= state.last_applied:
            return
    try:
        ShadowVolume(shadows, state).recover()
    except StateFileError as exc:
        raise SwitchError(f"{name}: cannot promote ({exc})") from None


def shadow_epoch(shadows: Path, name: str) -> tuple[int, int] | None:
    """(generation, last applied epoch) of shadows/NAME, if it has a readable state."""
    try:
        state = VolumeState.load(shadows / f"{name}.state")
    except StateFileError:
        return None
    return state.generation, state.last_applied
