"""Start and stop a lab: an optional etcd, a manager, N agents, and DIR/lab.json describing them.

Every process is a child of `lab up` started with PR_SET_PDEATHSIG (agent.children.spawn), so
even a `lab up` killed with SIGKILL leaves nothing behind: its children get SIGTERM from the
kernel, and each agent stops its own children in turn.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shadowblk.agent.children import SHADOWBLK, spawn, stop, wait_ready
from shadowblk.ports import free_port

LAB_FILE = "lab.json"
READY_S = 60.0


@dataclass(frozen=True)
class Replay:
    """A recorded drive one agent reports instead of smartctl (the agent's --smart-replay)."""

    file: Path
    serial: str | None = None
    start: str | None = None  # YYYY-MM-DD
    speed: float | None = None  # recorded days per second [default: the agent's]

    def argv(self) -> list[str]:
        argv = ["--smart-replay", str(self.file)]
        argv += ["--smart-serial", self.serial] if self.serial else []
        argv += ["--replay-start", self.start] if self.start else []
        return argv + (["--replay-speed", str(self.speed)] if self.speed else [])


@dataclass(frozen=True)
class Predictor:
    """The manager's failure predictor: its SMART model and its trigger (None: the manager's
    defaults)."""

    model: Path | None = None
    threshold: float | None = None
    sustain: str | None = None  # 30s, 10m, 1h
    dry_run: bool = False

    def argv(self) -> list[str]:
        argv = ["--model", str(self.model)] if self.model else []
        argv += ["--preempt-threshold", str(self.threshold)] if self.threshold else []
        argv += ["--preempt-sustain", self.sustain] if self.sustain else []
        return argv + (["--preempt-dry-run"] if self.dry_run else [])


@dataclass
class Options:
    servers: int
    zones: int
    store: str  # sqlite or etcd
    capacity: str
    heartbeat_interval: float
    heartbeat_timeout: float
    predictor: Predictor = field(default_factory=Predictor)
    replays: dict[str, Replay] = field(default_factory=dict)  # server name -> its drive


@dataclass
class Lab:
    """The running processes of one lab and what lab.json says about them."""

    dir: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    doc: dict[str, Any] = field(default_factory=dict)

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            proc = spawn(argv, stderr=log)
        self.procs.append((name, proc))
        return proc

    def up(self, opts: Options) -> None:
        """Start everything and write lab.json; RuntimeError (all stopped) if a part fails."""
        try:
            self._up(opts)
        except BaseException:
            self.down()
            raise

    def _up(self, opts: Options) -> None:
        token, key = self.dir / "token", self.dir / "hmac.key"
        for path in (token, key):
            if not path.exists():
                path.write_text(secrets.token_hex(32) + "\n")
                path.chmod(0o600)
        store, etcd = f"sqlite:{self.dir / 'manager.db'}", None
        if opts.store == "etcd":
            etcd = self._etcd()
            store = f"etcd://{etcd['url'].removeprefix('http://')}/shadowblk"
        manager = self._start(
            "manager",
            [*SHADOWBLK, "manager", "--store", store, "--listen", "127.0.0.1:0",
             "--token-file", str(token), "--state-dir", str(self.dir / "manager"),
             "--heartbeat-timeout", str(opts.heartbeat_timeout), *opts.predictor.argv()],
        )  # fmt: skip
        url = wait_ready(manager, "the manager", READY_S).removeprefix("ready ")
        agents = []
        for i in range(1, opts.servers + 1):
            name, zone = f"s{i}", f"z{(i - 1) % opts.zones + 1}"
            data_dir = self.dir / "servers" / name
            proc = self._start(
                name,
                [*SHADOWBLK, "agent", "--manager", url, "--token-file", str(token),
                 "--name", name, "--zone", zone, "--rack", f"r{i}",
                 "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
                 "--nbd-listen", "127.0.0.1:0", "--capacity", opts.capacity,
                 "--interval", str(opts.heartbeat_interval), "--hmac-key-file", str(key),
                 *(opts.replays[name].argv() if name in opts.replays else [])],
            )  # fmt: skip
            log = str(self.dir / "logs" / f"{name}.log")
            replay = opts.replays.get(name)
            agents.append(
                {"name": name, "zone": zone, "rack": f"r{i}", "pid": proc.pid,
                 "data_dir": str(data_dir), "log": log,
                 "smart_replay": _plain(replay) if replay else None}
            )  # fmt: skip
        for agent, (_name, proc) in zip(agents, self.procs[-len(agents) :], strict=True):
            wait_ready(proc, f"agent {agent['name']}", READY_S)
        self.doc = {
            "pid": os.getpid(),
            "store": store,
            "manager": {
                "url": url,
                "pid": manager.pid,
                "token_file": str(token),
                "log": str(self.dir / "logs" / "manager.log"),
                "predictor": _plain(opts.predictor),
            },
            "etcd": etcd,
            "hmac_key_file": str(key),
            "agents": agents,
        }
        write_json(self.dir / LAB_FILE, self.doc)

    def _etcd(self) -> dict[str, Any]:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server)")
        client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        proc = self._start(
            "etcd",
            [binary, "--name", "lab", "--data-dir", str(self.dir / "etcd"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"lab={peer}",
             "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}"],
        )  # fmt: skip
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {proc.returncode}: see logs/etcd.log")
            try:
                with urllib.request.urlopen(client + "/health", timeout=1) as reply:
                    if b'"true"' in reply.read():
                        return {"url": client, "pid": proc.pid}
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd did not become healthy: see logs/etcd.log")

    def down(self) -> None:
        """Stop agents (in parallel: each stops its children), then the manager, then etcd."""
        agents = [p for n, p in self.procs if n not in ("manager", "etcd")]
        for proc in agents:
            if proc.poll() is None:
                proc.terminate()
        for proc in agents:
            stop(proc, timeout=20)
        for name in ("manager", "etcd"):
            for proc in (p for n, p in self.procs if n == name):
                stop(proc, timeout=20)
        self.procs.clear()
        (self.dir / LAB_FILE).unlink(missing_ok=True)


def _plain(options: Replay | Predictor) -> dict[str, Any]:
    """OPTIONS as lab.json shows them (paths as text)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def read_lab(lab_dir: Path) -> dict[str, Any]:
    """DIR/lab.json of a running lab; FileNotFoundError if none runs there."""
    return json.loads((lab_dir / LAB_FILE).read_text())


def alive(pid: int) -> bool:
    """Whether PID runs a lab process (a zombie, ended but not yet reaped, counts as gone; so
    does a PID the system has given to another program since)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read()
    except OSError:
        return False
    return b"shadowblk" in argv or b"etcd" in argv


def take_down(lab_dir: Path, timeout: float = 60.0) -> bool:
    """SIGTERM the `lab up` of LAB_DIR and wait for it; False if it did not end in TIMEOUT.

    A `lab up` that is already gone leaves no children (PDEATHSIG), but lab.json would stay:
    then the recorded processes still alive get SIGTERM here, and lab.json goes.
    """
    doc = read_lab(lab_dir)
    pids = [doc["pid"], *(a["pid"] for a in doc["agents"]), doc["manager"]["pid"]]
    pids += [doc["etcd"]["pid"]] if doc.get("etcd") else []
    if not alive(doc["pid"]):
        for pid in pids[1:]:
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
        (lab_dir / LAB_FILE).unlink(missing_ok=True)
    else:
        os.kill(doc["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False
