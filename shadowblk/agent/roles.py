"""The agent's side of a switchover (docs/switchover.md): write leases, fencing, and a volume
changing role on this server (a shadow promoted, a primary demoted), on top of Hosting."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shadowblk.agent import switch
from shadowblk.agent.children import Child
from shadowblk.nbd import fence

if TYPE_CHECKING:
    from shadowblk.agent.hosting import Replication

log = logging.getLogger(__name__)

SOCKET_PATH_MAX = 100  # a Unix socket path must fit sockaddr_un (108 bytes)
STANDBY_READY_S = 60.0
HOLD_AFTER_PROMOTION_S = 120.0  # unless the manager releases it earlier
STOP_WAIT_S = 60.0  # a stopping shadow server first finishes the epoch it applies


def control_socket(primaries: Path, name: str) -> Path:
    """Where a primary's `serve` takes fence and lease commands (a short path if need be)."""
    path = primaries / f"{name}.ctl"
    if len(str(path)) <= SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"shadowblk-{digest}.ctl"


def shadow_servers(volume: dict[str, Any]) -> list[str]:
    """The shadow servers of a volume document."""
    return [s["server"] for s in volume.get("shadows", [])]


def _wait(proc: subprocess.Popen, what: str) -> None:
    try:
        proc.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        raise switch.SwitchError(f"{what} did not stop within {STOP_WAIT_S:.0f} s") from None


class RoleChanges:
    """Mixed into Hosting: the calls of the agent's control endpoint and the leases."""

    volumes: dict[str, dict[str, Any]]
    children: dict[str, Child]
    standby: dict[str, Child]
    leases: dict[str, float]
    _leased: dict[str, float]
    lease_until: float
    lock: threading.RLock
    primaries_dir: Path
    shadows_dir: Path
    shadow_child: Child
    shadow_held_until: float
    restart_shadow_server: bool
    replication: Replication
    save: Callable[[], None]
    on_starter: Callable[..., Any]
    _serve_argv: Callable[..., list[str]]
    _primary_child: Callable[[str], Child]

    def lease_left(self, name: str) -> float:
        return max(0.0, self.leases.get(name, 0.0) - time.monotonic())

    def renew(self, granted: dict[str, int], until: float) -> None:
        """The manager granted writes until UNTIL (monotonic) to the primaries in GRANTED
        (volume -> generation) that are still at that generation."""
        with self.lock:
            self.lease_until = until
            for name, generation in granted.items():
                rec = self.volumes.get(name)
                if rec and rec["role"] == "primary" and rec["volume"]["generation"] == generation:
                    self.leases[name] = until
                    if name in self.children and self.children[name].url:
                        self._push_lease(name)

    def _push_lease(self, name: str) -> None:
        until = self.leases.get(name, 0.0)
        try:
            fence.command(
                control_socket(self.primaries_dir, name),
                {"op": "lease", "seconds": self.lease_left(name)},
                timeout=2.0,
            )
            self._leased[name] = until
        except (OSError, ValueError) as err:
            log.warning("lease of %s not renewed: %s", name, err)

    def fence(self, name: str, drain_s: float) -> dict[str, Any]:
        """Fence NAME's primary for good and ship its last epoch (SwitchError if not hosted)."""
        with self.lock:
            rec = self.volumes.get(name)
            if rec is None or rec["role"] != "primary":
                raise switch.SwitchError(f"{name}: no primary of it here")
            self.leases.pop(name, None)  # a restarted `serve` starts fenced
        answer = fence.command(
            control_socket(self.primaries_dir, name),
            {"op": "fence", "drain": drain_s},
            timeout=drain_s + 10,
        )
        if not answer.get("ok"):
            raise switch.SwitchError(f"{name}: fence refused: {answer.get('error')}")
        return answer

    def drain(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Ask NAME's primary to ship everything written so far (it keeps accepting writes)."""
        with self.lock:
            rec = self.volumes.get(name)
            if rec is None or rec["role"] != "primary":
                raise switch.SwitchError(f"{name}: no primary of it here")
        path = control_socket(self.primaries_dir, name)
        return fence.command(path, {"op": "drain", "timeout": timeout_s}, timeout_s + 10)

    def prepare(self, name: str, volume: dict[str, Any]) -> None:
        """Start NAME's future `serve` in standby (loaded, not serving), to promote it fast."""
        with self.lock:
            rec = self.volumes.get(name)
            if rec is None or rec["role"] != "shadow":
                raise switch.SwitchError(f"{name}: no shadow of it here")
            old = self.standby.pop(name, None)
            if old is not None:
                old.stop()
            future = {"role": "primary", "volume": volume, "port": rec.get("port")}
            child = Child(f"standby {name}", lambda: self._serve_argv(name, future, True))
            self.standby[name] = child
        self.on_starter(lambda: child.tick(time.monotonic()))
        deadline = time.monotonic() + STANDBY_READY_S
        while True:  # loaded once its control socket answers: promoting it is then quick
            try:
                fence.command(control_socket(self.primaries_dir, name), {"op": "status"}, 1.0)
                return
            except (OSError, ValueError):
                if child.proc is None or child.proc.poll() is not None:
                    raise switch.SwitchError(f"{name}: the standby `serve` exited") from None
                if time.monotonic() > deadline:
                    raise switch.SwitchError(f"{name}: the standby `serve` did not start") from None
                time.sleep(0.01)

    def promote(self, name: str, volume: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Make the shadow of NAME its primary at VOLUME's generation; its endpoint and epoch.
        The shadow server is stopped first (it finishes and checkpoints the epoch it applies)
        and stays stopped until the manager releases it (`hold` 0) once the old primary is
        demoted: restarted earlier, it would take the fenced old primary's stream again."""
        with self.lock:
            rec = self.volumes.get(name)
            if rec is None or rec["role"] != "shadow":
                raise switch.SwitchError(f"{name}: no shadow of it here")
            proc = self.shadow_child.terminate()
            self.shadow_held_until = time.monotonic() + HOLD_AFTER_PROMOTION_S
        if proc is not None:  # not with the lock held
            _wait(proc, "the shadow server")
        child, epoch = self.on_starter(lambda: self._promote(name, volume, held=True))
        deadline = time.monotonic() + timeout
        while True:  # polled here, not by the loop's tick, to see the ready line at once
            with self.lock:
                if child.proc is not None and child.ready is not None:
                    child.url = child.url or child.ready.poll()
                if child.url is not None:
                    self._push_lease(name)
                    return {"endpoint": child.url, "epoch": epoch}
            if time.monotonic() > deadline:
                raise switch.SwitchError(f"{name}: the promoted primary did not start")
            time.sleep(0.002)

    def _promote(self, name: str, volume: dict[str, Any], held: bool) -> tuple[Child, int]:
        """The shadow's files become the primary's (recovered first: the image at the last
        committed epoch), served by the standby `serve` if one waits, else a new one."""
        rec = self.volumes[name]
        addresses = [self.replication.shadow_address(s) for s in shadow_servers(volume)]
        self.shadow_child.stop()
        switch.recover(self.shadows_dir, name)
        epoch = switch.take_shadow(self.shadows_dir, self.primaries_dir, name, addresses)
        self.volumes[name] = {"role": "primary", "volume": volume, "port": rec.get("port")}
        self.leases[name] = self.lease_until  # the agent's, until its next heartbeat
        child = self.standby.pop(name, None)
        if child is not None and child.proc is not None and child.proc.poll() is None:
            child.name = f"primary {name}"
            child.argv = lambda: self._serve_argv(name, self.volumes[name])
            fence.command(control_socket(self.primaries_dir, name), {"op": "go"})
        else:
            if child is not None:
                child.stop()
            child = self._primary_child(name)
        self.children[name] = child
        if not held:
            self.shadow_held_until = 0.0
        self.save()
        return child, epoch

    def hold(self, name: str, seconds: float) -> None:
        """Stop the shadow server for up to SECONDS (0: start it again), while NAME changes
        role: the old primary's host until it is demoted (the new primary's stream must find
        the demoted copy, not an unknown volume to create), the new primary's until then too
        (the fenced old primary must not find one)."""
        with self.lock:
            rec = self.volumes.get(name)
            if rec is None or rec["role"] != "primary":
                raise switch.SwitchError(f"{name}: no primary of it here")
            self.shadow_held_until = time.monotonic() + seconds
            proc = self.shadow_child.terminate() if seconds > 0 else None  # 0: released
        if proc is not None:  # no stream is taken any more once it has ended
            _wait(proc, "the shadow server")

    def demote(self, name: str, volume: dict[str, Any]) -> str:
        """Make the (fenced) primary of NAME a shadow of VOLUME's new primary again."""
        with self.lock:
            rec = self.volumes.get(name)
            if rec is None or rec["role"] != "primary":
                raise switch.SwitchError(f"{name}: no primary of it here")
            child = self.children.pop(name, None)
        if child is not None:
            child.stop()  # a clean stop waits a little for shadows: not with the lock held
        with self.lock:
            self._give_back(name, volume)
            return self.volumes[name]["resync"]

    def _demote(self, name: str, volume: dict[str, Any]) -> None:
        child = self.children.pop(name, None)
        if child is not None:
            child.stop()
        self._give_back(name, volume)

    def _give_back(self, name: str, volume: dict[str, Any]) -> None:
        self.leases.pop(name, None)
        new_primary = self.replication.shadow_address(volume["primary"])
        mode = switch.give_back(
            self.primaries_dir, self.shadows_dir, name, new_primary, volume["generation"]
        )
        self.volumes[name] = {"role": "shadow", "volume": volume, "resync": mode}
        self.shadow_held_until = 0.0
        self.restart_shadow_server = True
        self.save()
