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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shadowblk.agent import dirty_check, switch
from shadowblk.agent.children import SHADOWBLK, Child
from shadowblk.nbd import fence
from shadowblk.timings import Timings

if TYPE_CHECKING:
    from shadowblk.agent.hosting import Replication

log = logging.getLogger(__name__)

SOCKET_PATH_MAX = 100  # a Unix socket path must fit sockaddr_un (108 bytes)
STANDBY_READY_S = 60.0
HOLD_AFTER_PROMOTION_S = 120.0  # unless the manager releases it earlier
STOP_WAIT_S = 60.0  # a stopping shadow server first finishes the epoch it applies
PRIME_S = 60.0  # after `prepare`, the shadow server leaves the volume's commits alone this long
STANDBY_TTL_S = 180.0  # a standby never promoted (its primary's server came back) is stopped
SHADOW_SERVER = "_server"  # its control socket's name in the shadows' folder (no volume id)
ZYGOTE = "_zygote.ctl"  # the zygote's socket, in the agent's private folder


@dataclass
class Prepared:
    """A standby `serve`: what it was started for, and its shadows' addresses looked up then."""

    child: Child
    key: tuple[Any, ...]
    addresses: dict[str, str]
    since: float = field(default_factory=time.monotonic)


def standby_key(volume: dict[str, Any]) -> tuple[Any, ...]:
    """What a standby's command line depends on: one started for an equal key can serve."""
    fields = ("generation", "size_bytes", "block_size", "mode")
    return (*(volume.get(f) for f in fields), tuple(shadow_servers(volume)))


def control_socket(primaries: Path, name: str) -> Path:
    """Where a primary's `serve` takes fence and lease commands (a short path if need be)."""
    path = primaries / f"{name}.ctl"
    if len(str(path)) <= SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"shadowblk-{digest}.ctl"


def private_dir(data_dir: Path) -> Path:
    """A folder only this user can enter (0700), for the sockets whose commands run as the
    agent (the zygote's): DATA_DIR/run, or a fresh one under the temporary folder if a socket
    path there would not fit sockaddr_un (never a predictable path: Hosting.stop removes it)."""
    path = data_dir / "run"
    if len(str(path / ZYGOTE)) > SOCKET_PATH_MAX:
        return Path(tempfile.mkdtemp(prefix="shadowblk-"))  # 0700, a name nobody could foresee
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)  # made by an older agent, or under another umask
    return path


def shadow_servers(volume: dict[str, Any]) -> list[str]:
    """The shadow servers of a volume document."""
    return [s["server"] for s in volume.get("shadows", [])]


def _in_thread(func: Callable[..., None], *args: Any) -> Callable[[], None]:
    """FUNC(*ARGS) started on a thread now; the function returned waits for it to end and
    raises what it raised."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            func(*args)
        except BaseException as err:  # handed to the waiter
            failed.append(err)

    thread = threading.Thread(target=run, name=func.__name__, daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed[0]

    return wait


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
    data_dir: Path
    primaries_dir: Path
    shadows_dir: Path
    private_dir: Path
    shadow_child: Child
    zygote: Child
    shadow_held_until: float
    shadow_holds: dict[str, float]
    prepared: dict[str, Prepared]
    restart_shadow_server: bool
    replication: Replication
    save: Callable[[], None]
    on_starter: Callable[..., Any]
    _serve_argv: Callable[..., list[str]]
    _primary_child: Callable[[str], Child]

    @property
    def shadow_control(self) -> Path:
        """The shadow server's control socket: one volume handed over, the others go on."""
        return control_socket(self.shadows_dir, SHADOW_SERVER)

    @property
    def zygote_socket(self) -> Path:
        """Where the agent's zygote (shadowblk/agent/zygote.py) waits for its command line:
        whoever reaches it has a command run as the agent."""
        return self.private_dir / ZYGOTE

    def _start_serve(self, child: Child) -> None:
        """CHILD's `serve`: the zygote if one is ready (its imports done: no process start in
        the promotion's path), else a new one (lock held, on a thread that lives as long as
        the agent)."""
        if child.proc is None and self.zygote.proc is not None:
            try:
                args = child.argv()[len(SHADOWBLK) :]
                taken = fence.command(self.zygote_socket, {"args": args}, 5.0).get("ok")
            except (OSError, ValueError, LookupError):  # not listening yet: still loading
                taken = False
            proc = self.zygote.hand_off() if taken else None
            if proc is not None:
                child.adopt(proc)
                return
        child.tick(time.monotonic())

    def holds_left(self) -> dict[str, float]:
        """Seconds left of each volume's hold (the shadow server refuses streams for it)."""
        now = time.monotonic()
        with self.lock:  # changed by the control endpoint's threads
            holds = list(self.shadow_holds.items())
        return {name: until - now for name, until in holds if until > now}

    def _shadow_call(self, cmd: dict[str, Any]) -> dict[str, Any] | None:
        """CMD to the running shadow server; None if it could not take it (not running)."""
        if self.shadow_child.url is None:
            return None
        try:
            answer = fence.command(self.shadow_control, cmd, timeout=STOP_WAIT_S)
        except (OSError, ValueError) as err:
            log.warning("shadow server: %s %s: %s", cmd["op"], cmd.get("volume"), err)
            return None
        if not answer.get("ok"):
            log.warning("shadow server: %s %s: %s", cmd["op"], cmd.get("volume"), answer)
            return None
        return answer

    def _hand_over(self, name: str, seconds: float) -> None:
        """The shadow server lets go of NAME (its stream ends at an epoch boundary, checkpointed)
        and refuses streams for it for SECONDS, while its other volumes keep streaming; if it
        cannot be asked, it is stopped whole for that long."""
        with self.lock:  # read by the loop's tick (the shadow server's argv)
            self.shadow_holds[name] = time.monotonic() + seconds
        if self._shadow_call({"op": "release", "volume": name, "seconds": seconds}) is not None:
            return
        with self.lock:
            proc = self.shadow_child.terminate()
            self.shadow_held_until = max(self.shadow_held_until, time.monotonic() + seconds)
        if proc is not None:  # not with the lock held (unless the caller holds it)
            _wait(proc, "the shadow server")

    def _unhold(self, name: str) -> None:
        """End NAME's hold: the shadow server takes streams for it again, after loading the
        copy a demotion left here."""
        with self.lock:  # read by the loop's tick (the shadow server's argv)
            self.shadow_holds.pop(name, None)
            stopped = self.shadow_held_until > time.monotonic()
            if stopped:  # stopped whole: it starts at the next tick, reading every volume
                self.shadow_held_until = 0.0
        if not stopped and self._shadow_call({"op": "adopt", "volume": name}) is None:
            self.restart_shadow_server = True  # it may have started with the hold: again

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

    def fence(self, name: str, drain_s: float, dirty: int | None = None) -> dict[str, Any]:
        """Fence NAME's primary for good and ship its last epoch (SwitchError if not hosted).
        DIRTY (the generation the compare started at): the answer also carries the blocks
        whose map entry changed since the compare before the pause (`dirty` with `since`
        `seen`, dirty_check.primary_dirty), so that the compare in the pause makes one call
        less. Read once the fence answered: the fenced `serve` refuses every write for good,
        so its map no longer changes, exactly as for that call made afterwards."""
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
        if dirty is not None and answer.get("drained"):
            try:
                answer["dirty"] = dirty_check.primary_dirty(
                    self.data_dir, name, dirty, since_seen=True
                )
            except (dirty_check.CheckError, OSError, ValueError) as err:  # the compare asks
                answer["dirty_error"] = str(err)  # again, and says what it got
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
        """Start NAME's future `serve` in standby (loaded, not serving), to promote it fast; look
        its shadows' addresses up now (not in the pause); have the shadow server checkpoint NAME
        now and not again until the promotion (docs/switchover.md)."""
        try:
            addresses = {s: self.replication.shadow_address(s) for s in shadow_servers(volume)}
        except LookupError:  # looked up again at the promotion
            addresses = {}
        with self.lock:
            rec = self.volumes.get(name)
            if rec is None or rec["role"] != "shadow":
                raise switch.SwitchError(f"{name}: no shadow of it here")
            old = self.prepared.get(name)
            if old and old.key == standby_key(volume) and old.child.proc is not None:
                child = old.child  # started for this very promotion (an emergency's warm-up)
            else:
                self._drop_standby(name)
                future = {"role": "primary", "volume": volume, "port": rec.get("port")}
                child = Child(f"standby {name}", lambda: self._serve_argv(name, future, True))
                self.standby[name] = child
                self.prepared[name] = Prepared(child, standby_key(volume), addresses)
        self.on_starter(lambda: self._start_serve(child))
        deadline = time.monotonic() + STANDBY_READY_S
        while True:  # loaded once its control socket answers: promoting it is then quick
            try:
                fence.command(control_socket(self.primaries_dir, name), {"op": "status"}, 1.0)
                self._shadow_call({"op": "prime", "volume": name, "seconds": PRIME_S})
                return
            except (OSError, ValueError):
                if child.proc is None or child.proc.poll() is not None:
                    raise switch.SwitchError(f"{name}: the standby `serve` exited") from None
                if time.monotonic() > deadline:
                    raise switch.SwitchError(f"{name}: the standby `serve` did not start") from None
                time.sleep(0.01)

    def prime(self, name: str, wait_s: float) -> dict[str, Any]:
        """Have the shadow server checkpoint NAME now, at its next epoch boundary, and answer
        once it did (at most WAIT_S): called once the drain before the pause caught up, so the
        checkpoint of the promotion's hand-over (`release`, in the VM's pause) syncs only what
        was applied since (the last drain round and the final epoch), not every epoch since
        `prepare`. A checkpoint only makes the image durable at an epoch boundary (the shadow's
        own rule, I1); it changes no content, and no acknowledgement depends on it (I2: a
        `sync` epoch is acknowledged once in the journal), so it may come earlier."""
        with self.lock:
            rec = self.volumes.get(name)
            if rec is None or rec["role"] != "shadow":
                raise switch.SwitchError(f"{name}: no shadow of it here")
        cmd = {"op": "prime", "volume": name, "seconds": PRIME_S, "wait": wait_s}
        answer = self._shadow_call(cmd)
        return {"checkpointed": bool(answer and answer.get("checkpointed"))}

    def handover(self, name: str, seconds: float) -> dict[str, Any]:
        """The shadow server lets go of NAME now, ahead of `promote` (a planned switchover's
        pause: its checkpoint's syncs overlap the checksum compare, which reads the files, not
        the shadow server), and refuses streams for it for SECONDS; 0: it takes NAME back (a
        switchover that will not promote, e.g. an aborted compare). Safe once the old primary
        is fenced and its last epoch applied (the manager calls it only then): nothing more
        may reach the shadow (its stream would be the fenced primary's), the hand-over changes
        no content (the stream ends at the epoch boundary it is at, checkpointed: image, map
        and state durable at the applied epoch, I1), and the hold keeps every stream out
        until the demotion, as `promote`'s own hand-over does."""
        with self.lock:
            rec = self.volumes.get(name)
            if rec is None or rec["role"] != "shadow":
                raise switch.SwitchError(f"{name}: no shadow of it here")
        if seconds <= 0:
            self._unhold(name)
        else:
            self._hand_over(name, seconds)
        return {"ok": True}

    def promote(self, name: str, volume: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Make the shadow of NAME its primary at VOLUME's generation; its endpoint, epoch and
        the milliseconds of each step. The shadow server hands NAME over (it finishes and
        checkpoints the epoch it applies; its other volumes keep streaming; if `handover` came
        first, the shadow server no longer has it and answers at once: asked all the same, in
        case it was restarted meanwhile and loaded the volume again) and refuses streams for
        it until the manager releases it (`hold` 0) once the old primary is demoted: else it
        would take the fenced old primary's stream again."""
        with self.lock:
            rec = self.volumes.get(name)
            if rec is None or rec["role"] != "shadow":
                raise switch.SwitchError(f"{name}: no shadow of it here")
        steps = Timings()
        self._hand_over(name, HOLD_AFTER_PROMOTION_S)
        steps.mark("release_ms")
        child, epoch = self.on_starter(lambda: self._promote(name, volume, held=True, steps=steps))
        deadline = time.monotonic() + timeout
        while True:  # polled here, not by the loop's tick, to see the ready line at once
            with self.lock:
                if child.proc is not None and child.ready is not None:
                    child.url = child.url or child.ready.poll()
                if child.url is not None:
                    steps.mark("ready_ms")
                    if self._leased.get(name) != self.leases.get(name):  # not given with `go`
                        self._push_lease(name)
                    steps.mark("lease_ms")
                    return {"endpoint": child.url, "epoch": epoch, "steps_ms": steps.ms}
            if time.monotonic() > deadline:
                raise switch.SwitchError(f"{name}: the promoted primary did not start")
            time.sleep(0.002)

    def _promote(
        self, name: str, volume: dict[str, Any], held: bool, steps: Timings | None = None
    ) -> tuple[Child, int]:
        """The shadow's files become the primary's (recovered first: the image at the last
        committed epoch), served by the standby `serve` if one waits, else a new one. HELD:
        the caller had the shadow server hand NAME over, and the manager ends the hold."""
        steps = steps or Timings()
        steps.mark("dispatch_ms")
        rec = self.volumes[name]
        prepared = self.prepared.pop(name, None)
        known = prepared.addresses if prepared else {}
        addresses = [
            known.get(s) or self.replication.shadow_address(s) for s in shadow_servers(volume)
        ]
        if not held:
            self._hand_over(name, HOLD_AFTER_PROMOTION_S)
        switch.recover(self.shadows_dir, name)
        steps.mark("recover_ms")
        child = self.standby.get(name)
        waiting = child is not None and child.proc is not None and child.proc.poll() is None
        # a waiting standby opened its tracking state already; the replication state's syncs
        # are made while it opens the volume (switch.settle)
        epoch = switch.take_shadow(
            self.shadows_dir, self.primaries_dir, name, addresses, waiting, not waiting
        )
        self.standby.pop(name, None)  # only now: a failed take leaves it where stop finds it
        steps.mark("take_ms")
        self.volumes[name] = {"role": "primary", "volume": volume, "port": rec.get("port")}
        self.leases[name] = self.lease_until  # the agent's, until its next heartbeat
        settled: Callable[[], None] | None = None
        if waiting and child is not None:
            child.name = f"primary {name}"
            child.argv = lambda: self._serve_argv(name, self.volumes[name])
            go = {"op": "go", "lease": self.lease_left(name)}
            try:
                fence.command(control_socket(self.primaries_dir, name), go)
            except BaseException:
                switch.settle(self.shadows_dir, self.primaries_dir, name)
                raise
            # settled before `promote` answers (no write reaches the new primary before it),
            # on a thread: its syncs overlap agent.json's below and the standby's start
            settled = _in_thread(switch.settle, self.shadows_dir, self.primaries_dir, name)
            self._leased[name] = self.leases[name]
        else:
            if child is not None:
                child.stop()
            child = self._primary_child(name)
            self._start_serve(child)  # no standby (an emergency without one): the zygote
        self.children[name] = child
        try:
            self.save()
        finally:  # joined whatever happens: its error is not lost behind save()'s
            if settled is not None:
                settled()
        if not held:  # after settle moved the shadow's files away: a stream let in now
            self._unhold(name)  # re-creates the volume, and settle must not unlink its journal
        steps.mark("go_ms")
        return child, epoch

    def _drop_standby(self, name: str) -> None:
        self.prepared.pop(name, None)
        child = self.standby.pop(name, None)
        if child is not None:
            child.stop()

    def expire_standbys(self, now: float) -> None:
        """Stop the standbys never promoted (lock held): their primary's server came back."""
        for name, prepared in list(self.prepared.items()):
            if now - prepared.since > STANDBY_TTL_S:
                log.info("standby of %s not promoted in %.0f s: stopped", name, STANDBY_TTL_S)
                self._drop_standby(name)

    def hold(self, name: str, seconds: float) -> None:
        """Have the shadow server refuse streams for NAME for up to SECONDS (0: take them
        again, loading a demoted copy), while NAME changes role: on the old primary's host
        until it is demoted (the new primary's stream must find the demoted copy, not an
        unknown volume to create), on the new primary's until then too (the fenced old
        primary must not find one)."""
        with self.lock:
            rec = self.volumes.get(name)
            if rec is None or rec["role"] != "primary":
                raise switch.SwitchError(f"{name}: no primary of it here")
        if seconds > 0:
            self._hand_over(name, seconds)  # no stream for it is taken once this returns
        else:
            self._unhold(name)

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
            mode = self.volumes[name]["resync"]
        self._unhold(name)  # loading the copy takes a while: not with the lock held
        return mode

    def _demote(self, name: str, volume: dict[str, Any]) -> None:
        child = self.children.pop(name, None)
        if child is not None:
            child.stop()
        self._give_back(name, volume)
        threading.Thread(target=self._unhold, args=(name,), daemon=True).start()  # off the lock

    def _give_back(self, name: str, volume: dict[str, Any]) -> None:
        self.leases.pop(name, None)
        new_primary = self.replication.shadow_address(volume["primary"])
        mode = switch.give_back(
            self.primaries_dir, self.shadows_dir, name, new_primary, volume["generation"]
        )
        self.volumes[name] = {"role": "shadow", "volume": volume, "resync": mode}
        self.save()
