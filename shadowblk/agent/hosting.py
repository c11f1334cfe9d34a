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
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shadowblk.agent.children import SHADOWBLK, Child

log = logging.getLogger(__name__)


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


def _shadows(volume: dict[str, Any]) -> list[str]:
    """The shadow servers of a volume document."""
    return [s["server"] for s in volume.get("shadows", [])]


def url_port(url: str) -> int:
    """The port of a `ready` URL such as nbd://127.0.0.1:10809/v1."""
    return urlsplit(url).port or 0


@dataclass
class Replication:
    """How primaries reach their shadows: the serve flags, once `serve` has them."""

    supported: bool  # `shadowblk serve --help` lists --shadow
    hmac_key_file: Path
    shadow_address: Callable[[str], str]  # server name -> its shadow HOST:PORT (LookupError)


class Hosting:
    """What this agent hosts, persisted, and the supervised children serving it."""

    def __init__(
        self, data_dir: Path, listen: Endpoint, nbd_listen: Endpoint, replication: Replication
    ) -> None:
        self.data_dir, self.nbd_listen, self.replication = data_dir, nbd_listen, replication
        self.state_file = data_dir / "agent.json"
        self.primaries_dir, self.shadows_dir = data_dir / "primaries", data_dir / "shadows"
        for d in (self.primaries_dir, self.shadows_dir):
            d.mkdir(parents=True, exist_ok=True)
        saved = self._load()
        self.orders_since: int = saved.get("orders_since", 0)
        self.volumes: dict[str, dict[str, Any]] = saved.get("volumes", {})
        self.shadow_port: int = saved.get("shadow_port") or listen.port
        self.listen = listen
        self.shadow_child = Child("shadow server", self._shadow_argv)
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
            "--data-dir", str(self.shadows_dir),
            "--hmac-key-file", str(self.replication.hmac_key_file),
        ]  # fmt: skip

    def _primary_child(self, name: str) -> Child:
        return Child(f"primary {name}", lambda: self._serve_argv(name))

    def _serve_argv(self, name: str) -> list[str]:
        rec = self.volumes[name]
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
        ]  # fmt: skip
        shadows = _shadows(volume)
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

    def tick(self, now: float) -> None:
        """Run every child's supervision step; remember the ports they bound (port 0)."""
        self.shadow_child.tick(now)
        if self.shadow_child.url and url_port(self.shadow_child.url) != self.shadow_port:
            self.shadow_port = url_port(self.shadow_child.url)
            self.save()
        for name, child in self.children.items():
            child.tick(now)
            rec = self.volumes[name]
            if child.url and rec.get("port") != url_port(child.url):
                rec["port"] = url_port(child.url)
                self.save()

    def stop(self) -> None:
        """Stop the primaries first (they ship to shadows), then the shadow server."""
        for child in self.children.values():
            child.stop()
        self.shadow_child.stop()

    # orders
    def apply(self, order: dict[str, Any]) -> None:
        """Act on one order from the manager and remember that it was read."""
        kind, name, detail = order["kind"], order["subject"], order.get("detail", {})
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
        before = _shadows(rec["volume"]) if rec else []
        if rec is not None and rec["role"] != role:
            self._drop(name)  # a role change: the old copy's files are not the new role's
            rec = None
        log.info("hosting %s as %s", name, role)
        self.volumes[name] = {"role": role, "volume": volume, "port": (rec or {}).get("port")}
        child = self.children.get(name)
        if role == "primary" and child is None:
            self.children[name] = self._primary_child(name)
        elif child is not None and self.replication.supported and before != _shadows(volume):
            child.stop()  # started again at the next tick, with the new --shadow list

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

    # the heartbeat's view
    def report(self) -> dict[str, dict[str, Any]]:
        """Each hosted volume's role, endpoint (where to connect) and serving state."""
        doc = {}
        for name, rec in self.volumes.items():
            child = self.children.get(name) if rec["role"] == "primary" else self.shadow_child
            assert child is not None
            entry: dict[str, Any] = {"role": rec["role"], "state": child.state}
            if child.url:
                entry["endpoint"] = child.url
            if child.restarts:
                entry["restarts"] = child.restarts
            doc[name] = entry
        return doc
