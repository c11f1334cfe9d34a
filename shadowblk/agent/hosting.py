"""The volumes one agent hosts, as the manager ordered, and the children that serve them.

One `shadowblk shadow` child serves every shadow volume (DATA_DIR/shadows); one `shadowblk
serve` child per primary volume (DATA_DIR/primaries/VOLUME.img, tracking state in
VOLUME.state/). What is hosted, the next order to read and the ports in use are kept in
DATA_DIR/agent.json, so a restarted agent serves the same volumes on the same ports at once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shadowblk.agent import switch
from shadowblk.agent.children import SHADOWBLK, Child
from shadowblk.agent.roles import (
    Prepared,
    RoleChanges,
    control_socket,
    private_dir,
    shadow_servers,
)
from shadowblk.nbd import fence
from shadowblk.nbd.replication import StatusUnavailable, read_status

log = logging.getLogger(__name__)

STOP_DRAIN_S = 2  # a stopping primary's wait for its shadows (a fenced one has shipped all)


@dataclass(frozen=True)
class Endpoint:
    """HOST:PORT given on the command line (port 0: any free port)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{text!r} is not HOST:PORT")
        return cls(host.strip("[]"), int(port))

    def with_port(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"


def url_port(url: str) -> int:
    """The port of a `ready` URL such as nbd://127.0.0.1:10809/v1."""
    return urlsplit(url).port or 0


@dataclass
class Replication:
    """How primaries reach their shadows: the serve flags, once `serve` has them."""

    supported: bool  # `shadowblk serve --help` lists --shadow
    hmac_key_file: Path
    shadow_address: Callable[[str], str]  # server name -> its shadow HOST:PORT (LookupError)


class Hosting(RoleChanges):
    """What this agent hosts, persisted, and the supervised children serving it (the
    switchover's role changes and the write leases: RoleChanges)."""

    def __init__(
        self, data_dir: Path, listen: Endpoint, nbd_listen: Endpoint, replication: Replication
    ) -> None:
        self.data_dir, self.nbd_listen, self.replication = data_dir, nbd_listen, replication
        self.state_file = data_dir / "agent.json"
        self.primaries_dir, self.shadows_dir = data_dir / "primaries", data_dir / "shadows"
        for d in (self.primaries_dir, self.shadows_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.private_dir = private_dir(data_dir)
        saved = self._load()
        self.orders_since: int = saved.get("orders_since", 0)
        self.volumes: dict[str, dict[str, Any]] = saved.get("volumes", {})
        self.shadow_port: int = saved.get("shadow_port") or listen.port
        self.verify_port: int = saved.get("verify_port") or 0  # the shadows' verify port
        self.listen = listen
        self.lock = threading.RLock()  # the loop's ticks and orders, the control endpoint's calls
        self.leases: dict[str, float] = {}  # volume -> monotonic end of its write lease
        self.lease_until = 0.0  # what the manager's last answered heartbeat granted
        self._leased: dict[str, float] = {}  # what each running `serve` was last told
        self.standby: dict[str, Child] = {}  # shadows about to be promoted, `serve --standby`
        self.restart_shadow_server = False
        self.shadow_held_until = 0.0  # monotonic: the shadow server stays stopped until then
        self.shadow_holds: dict[str, float] = {}  # volume -> monotonic end: refused by it
        self.prepared: dict[str, Prepared] = {}  # the standbys' volumes
        self.wake = threading.Event()  # set: the agent's loop ticks at once
        self.calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._starter = threading.Thread(target=self._run_calls, name="starter", daemon=True)
        self._starter.start()
        self.shadow_child = Child("shadow server", self._shadow_argv)
        self.zygote = Child("zygote", self._zygote_argv)  # the next standby `serve`, pre-loaded
        self.children: dict[str, Child] = {
            name: self._primary_child(name)
            for name, rec in self.volumes.items()
            if rec["role"] == "primary"
        }

    # persistence
    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}

    def save(self) -> None:
        """Write agent.json atomically (a crash leaves the old or the new file, never half)."""
        doc = {
            "orders_since": self.orders_since,
            "shadow_port": self.shadow_port,
            "verify_port": self.verify_port,
            "volumes": self.volumes,
        }
        tmp = self.state_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    # children
    def _shadow_argv(self) -> list[str]:
        return [
            *SHADOWBLK, "shadow",
            "--listen", self.listen.with_port(self.shadow_port),
            "--verify-listen", self.listen.with_port(self.verify_port),
            "--data-dir", str(self.shadows_dir),
            "--hmac-key-file", str(self.replication.hmac_key_file),
            "--control-socket", str(self.shadow_control),
            *(f"--hold={name}={left:.3f}" for name, left in self.holds_left().items()),
        ]  # fmt: skip

    def _zygote_argv(self) -> list[str]:
        return [sys.executable, "-m", "shadowblk.agent.zygote", str(self.zygote_socket)]

    def _primary_child(self, name: str) -> Child:
        return Child(f"primary {name}", lambda: self._serve_argv(name, self.volumes[name]))

    def _serve_argv(self, name: str, rec: dict[str, Any], standby: bool = False) -> list[str]:
        volume = rec["volume"]
        if rec.get("port") is None and self.nbd_listen.port:
            rec["port"] = self._free_port()  # taken now, so the next volume gets another
        argv = [
            *SHADOWBLK, "serve", str(self.primaries_dir / f"{name}.img"),
            "--listen", self.nbd_listen.with_port(rec.get("port") or 0),
            "--name", name,
            "--size", str(volume["size_bytes"]),
            "--block-size", str(volume["block_size"]),
            "--state-dir", str(self.primaries_dir / f"{name}.state"),
            "--control-socket", str(control_socket(self.primaries_dir, name)),
            "--lease", f"{self.lease_left(name):.3f}",
            "--generation", str(volume.get("generation", 1)),
            "--drain-timeout", str(STOP_DRAIN_S),
        ]  # fmt: skip
        if standby:
            argv.append("--standby")
        shadows = shadow_servers(volume)
        if self.replication.supported and shadows:
            for server in shadows:
                argv += ["--shadow", self.replication.shadow_address(server)]
            argv += ["--mode", volume["mode"]]
            argv += ["--hmac-key-file", str(self.replication.hmac_key_file)]
        return argv

    def _free_port(self) -> int:
        """The lowest port from --nbd-listen's that no hosted volume has."""
        taken = {rec.get("port") for rec in self.volumes.values()}
        port = self.nbd_listen.port
        while port in taken:
            port += 1
        return port

    def on_starter(self, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
        """FN() on the starter thread, which lives as long as the agent: a child must be started
        by a thread that does not end, as PR_SET_PDEATHSIG ends a child when the *thread* that
        started it ends (the control endpoint's threads end after each call)."""
        done: Future = Future()
        self.calls.put((fn, done))
        return done.result(timeout)

    def _run_calls(self) -> None:
        while True:
            fn, done = self.calls.get()
            try:
                with self.lock:
                    done.set_result(fn())
            except BaseException as err:  # handed to the caller's thread
                done.set_exception(err)

    def tick(self, now: float) -> None:
        """Run every child's supervision step; remember the ports they bound (port 0); tell a
        `serve` that just started its lease."""
        with self.lock:
            if self.restart_shadow_server:
                self.restart_shadow_server = False
                self.shadow_child.terminate()  # it reads its volumes' states again at start
            if now >= self.shadow_held_until:
                self.shadow_child.tick(now)
            self.note_shadow_ports()
            for name, child in self.children.items():
                child.tick(now)
                rec = self.volumes[name]
                if child.url and rec.get("port") != url_port(child.url):
                    rec["port"] = url_port(child.url)
                    self.save()
                if child.url and self._leased.get(name) != self.leases.get(name):
                    self._push_lease(name)
            self.expire_standbys(now)
            if any(rec["role"] == "shadow" for rec in self.volumes.values()):
                self.zygote.tick(now)  # a promotion's standby starts from it
            else:
                self.zygote.stop()  # nothing here can be promoted
            for child in self.standby.values():
                child.tick(now)

    def note_shadow_ports(self) -> None:
        """Remember the ports the shadow server bound (port 0 at its first start), so that a
        restart keeps the addresses registered with the manager."""
        with self.lock:
            child = self.shadow_child
            if child.url is None or child.ready is None:
                return
            verify = child.ready.line("verify ")
            ports = (url_port(child.url), url_port(verify) if verify else self.verify_port)
            if ports != (self.shadow_port, self.verify_port):
                self.shadow_port, self.verify_port = ports
                self.save()

    def stop(self) -> None:
        """Stop the primaries first (they ship to shadows), then the shadow server."""
        with self.lock:
            for child in [*self.children.values(), *self.standby.values(), self.zygote]:
                child.stop()
            self.shadow_child.stop()
        if not self.private_dir.is_relative_to(self.data_dir):  # a temporary one
            shutil.rmtree(self.private_dir, ignore_errors=True)

    # orders
    def apply(self, order: dict[str, Any]) -> None:
        """Act on one order from the manager and remember that it was read."""
        kind, name, detail = order["kind"], order["subject"], order.get("detail", {})
        with self.lock:
            if kind == "host-volume" and detail.get("role") in ("primary", "shadow"):
                self._host(name, detail["role"], detail["volume"])
            elif kind == "drop-volume":
                self._drop(name)
            else:
                log.warning("ignoring order %s: not one this agent knows", order.get("order_id"))
            self.orders_since = max(self.orders_since, order["seq"])
            self.save()

    def _host(self, name: str, role: str, volume: dict[str, Any]) -> None:
        rec = self.volumes.get(name)
        before = shadow_servers(rec["volume"]) if rec else []
        if rec is not None and rec["volume"].get("generation", 1) > volume.get("generation", 1):
            log.info("order for %s of an older generation: already past it", name)
            return
        if rec is not None and (rec["role"], role) == ("primary", "shadow"):
            self._demote(name, volume)  # a switchover this agent missed (it was away)
            return
        if rec is not None and (rec["role"], role) == ("shadow", "primary"):
            try:
                self._promote(name, volume, held=False)  # the manager could not call it
            except switch.SwitchError as err:  # no valid copy here: never an empty primary
                log.error("cannot promote %s as ordered: %s", name, err)
            return
        if rec is not None and rec["role"] != role:
            self._drop(name)  # a role change: the old copy's files are not the new role's
            rec = None
        log.info("hosting %s as %s", name, role)
        self.volumes[name] = {**(rec or {}), "role": role, "volume": volume}
        child = self.children.get(name)
        if role == "primary" and child is None:
            self.children[name] = self._primary_child(name)
        elif (
            child is not None
            and self.replication.supported
            and before != shadow_servers(volume)
            and not self._reship(name, volume)  # the running `serve` takes them: no restart
        ):
            child.stop()  # started again at the next tick, with the new --shadow list

    def _reship(self, name: str, volume: dict[str, Any]) -> bool:
        """Have NAME's running `serve` ship to VOLUME's shadows from now on, without a restart
        (which would hold the VM's I/O for seconds): whether it took them."""
        child = self.children.get(name)
        if child is None or child.url is None:
            return False
        try:
            addresses = [self.replication.shadow_address(s) for s in shadow_servers(volume)]
            answer = fence.command(
                control_socket(self.primaries_dir, name), {"op": "shadows", "shadows": addresses}
            )
        except (LookupError, OSError, ValueError) as err:
            log.warning("%s: new shadows not taken by its serve (%s): restarting it", name, err)
            return False
        if not answer.get("ok"):
            log.warning("%s: new shadows not taken by its serve (%s): restarting it", name,
                        answer.get("error"))  # fmt: skip
            return False
        log.info("%s: its serve ships to %s from now on (added %s)", name, addresses,
                 answer.get("added"))  # fmt: skip
        return True

    def _drop(self, name: str) -> None:
        rec = self.volumes.pop(name, None)
        if rec is None:
            return
        log.info("dropping %s (%s)", name, rec["role"])
        child = self.children.pop(name, None)
        if child is not None:
            child.stop()
        base = self.primaries_dir if rec["role"] == "primary" else self.shadows_dir
        for suffix in (".img", ".state", ".journal", ".map"):
            path = base / f"{name}{suffix}"
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _replication(self, name: str) -> dict[str, Any]:
        """A running primary's view of its shadows: which are in step, what each acknowledged."""
        try:
            status = read_status(self.primaries_dir / f"{name}.state")
        except StatusUnavailable:
            return {}
        shadows = {
            s["address"]: {"in_sync": bool(s["in_sync"]), "acked_epoch": int(s["acked_epoch"])}
            for s in status.get("shadows", [])
        }
        return {"epoch": int(status.get("last_cut_epoch", 0)), "shadows": shadows}

    # the heartbeat's view
    def report(self) -> dict[str, dict[str, Any]]:
        """Each hosted volume's role, endpoint (where to connect), serving state, generation
        and epoch (a shadow's last applied one)."""
        doc = {}
        with self.lock:
            for name, rec in self.volumes.items():
                child = self.children.get(name) if rec["role"] == "primary" else self.shadow_child
                entry: dict[str, Any] = {
                    "role": rec["role"],
                    "state": child.state if child else "starting",  # None: being demoted
                }
                if child and child.url:
                    entry["endpoint"] = child.url
                if child and child.restarts:
                    entry["restarts"] = child.restarts
                entry["generation"] = rec["volume"].get("generation", 1)
                if rec["role"] == "shadow" and (
                    found := switch.shadow_epoch(self.shadows_dir, name)
                ):
                    entry["generation"], entry["epoch"] = found
                if rec["role"] == "primary":
                    entry.update(self._replication(name))
                doc[name] = entry
        return doc
