"""The primary's fence switch (I3): once fenced, `serve` refuses every write with ESHUTDOWN.

A `serve` started with `--control-socket PATH` listens on that Unix socket for one-line JSON
commands from its agent:

    {"op": "go", "lease": S}       a `--standby` serve opens its volume and starts serving,
                                   with writes allowed for S seconds (optional: the promotion's
                                   lease comes with it, not in a second call after the start)
    {"op": "lease", "seconds": S}  writes are allowed for S more seconds (renewed by the agent
                                   after every heartbeat the manager answered)
    {"op": "drain", "timeout": T}  ship everything written so far, wait up to T s for the
                                   shadows to apply it (writes go on: a switchover's warm-up);
                                   again while a round takes long, so that what the fence is
                                   left with shrinks to what a short round lets be written
    {"op": "fence", "drain": T}    refuse every write from now on, ship the last epoch and wait
                                   up to T s for the shadows to apply it; answers the final epoch
    {"op": "status"}
    {"op": "shadows", "shadows": ["HOST:PORT", ...]}
                                   ship to these shadows from now on, without a restart (a new
                                   one gets a full sync; a dropped one's link stops); answers
                                   the addresses added. Unknown to a `serve` without --shadow

Each answer is one JSON line. A lease that runs out fences the primary too, but revocably: the
next lease lifts it (the manager grants one only while this server is still the volume's
primary). An explicit fence is for good. ESHUTDOWN is what `attach` holds and retries on the
new primary, so a VM behind attach never sees the refusal.

The fence is the first write observer: it runs under the tracker's `ordering` lock, before the
replicator captures the write, so a refused write never reaches a shadow, and setting the flag
under the same lock means no accepted write is left between capture and the volume when the
last epoch is cut.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from shadowblk.nbd.replication import ReplicationObserver
from shadowblk.tracking.tracker import WriteTracker

log = logging.getLogger(__name__)

MAX_LINE = 4096
DRAIN_ROUNDS = 5  # a drain repeats while a round takes CONVERGED_MS or more, this many at most
CONVERGED_MS = 50.0  # a round this short leaves the fence about as little to ship


class Fence:
    """A WriteObserver that refuses writes once fenced or once its lease has run out."""

    def __init__(self, lease_s: float | None) -> None:
        self.fenced_for_good = False
        self.lease_until = None if lease_s is None else time.monotonic() + lease_s
        self.tracker: WriteTracker | None = None
        self.replication: ReplicationObserver | None = None

    @property
    def fenced(self) -> bool:
        if self.fenced_for_good:
            return True
        return self.lease_until is not None and time.monotonic() >= self.lease_until

    def _refuse(self) -> None:
        if self.fenced:
            why = "fenced" if self.fenced_for_good else "its lease ran out"
            raise OSError(errno.ESHUTDOWN, f"this primary is {why}: refusing writes")

    def on_write(self, offset: int, data: bytes) -> None:
        self._refuse()

    def on_zero(self, offset: int, length: int) -> None:
        self._refuse()

    def on_trim(self, offset: int, length: int) -> None:
        self._refuse()

    def on_flush(self) -> None:
        self._refuse()  # the new primary answers the retried FLUSH

    def renew(self, seconds: float) -> None:
        if not self.fenced_for_good:
            self.lease_until = time.monotonic() + seconds

    def fence(self, drain_s: float) -> dict[str, Any]:
        """Fence for good, cut the last epoch and wait for the shadows to apply it."""
        started = time.monotonic()
        held = self.tracker.ordering if self.tracker is not None else contextlib.nullcontext()
        with held:  # no accepted write is left between its capture and the volume
            self.fenced_for_good = True
        answer: dict[str, Any] = {"fenced": True, "epoch": 0, "drained": True, "delta_bytes": 0}
        if self.replication is not None:
            rep = self.replication.replicator
            answer["delta_bytes"] = rep.status()["lag_bytes"]
            answer["drained"] = rep.drain(drain_s)
            status = rep.status()
            answer["epoch"] = status["last_cut_epoch"]
            answer["shadows"] = {s["address"]: s["acked_epoch"] for s in status["shadows"]}
        answer["fence_ms"] = round((time.monotonic() - started) * 1000, 3)
        log.warning("fenced: refusing every write; last epoch %d", answer["epoch"])
        return answer

    def drain(self, timeout_s: float) -> dict[str, Any]:
        """Cut and wait for the shadows to apply everything, still accepting writes: before a
        switchover pauses the VM, so that the fence has little left to ship. Rounds repeat
        while they take long, not once the time left is shorter than the last one took; the
        answer is the last round that drained (a later one cut short does not undo it)."""
        if self.replication is None:
            return {"drained": True, "epoch": 0}
        rep = self.replication.replicator
        deadline, rounds = time.monotonic() + timeout_s, []
        drained = None  # the epoch of the last round that drained
        while True:  # again while a round takes long: what was written meanwhile ships now
            started = time.monotonic()
            ok = rep.drain(max(0.0, deadline - started))
            ended = time.monotonic()
            rounds.append(round((ended - started) * 1000, 3))
            if not ok:
                break  # a round cut short by the deadline: an earlier one that drained stands
            drained = rep.last_cut
            if rounds[-1] < CONVERGED_MS or len(rounds) >= DRAIN_ROUNDS:
                break
            if deadline - ended < ended - started:  # another round would likely run out of time
                break
        if drained is None:
            return {"drained": False, "epoch": rep.last_cut, "rounds_ms": rounds}
        return {"drained": True, "epoch": drained, "rounds_ms": rounds}

    def status(self) -> dict[str, Any]:
        left = None if self.lease_until is None else self.lease_until - time.monotonic()
        return {
            "fenced": self.fenced,
            "for_good": self.fenced_for_good,
            "lease_s": None if left is None else round(left, 3),
        }


class ControlSocket:
    """The Unix socket the agent drives the fence (and a standby's start) through."""

    def __init__(self, path: Path, fence: Fence) -> None:
        self.path, self.fence = path, fence
        self.go = threading.Event()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o600)
        self._sock.listen(8)
        threading.Thread(target=self._accept, name="fence-control", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                if len(line) > MAX_LINE:
                    return
                stream.write(json.dumps(self._answer(line)).encode() + b"\n")
                stream.flush()

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "go":
                if "lease" in cmd:
                    self.fence.renew(float(cmd["lease"]))
                self.go.set()
                return {"ok": True}
            if op == "lease":
                self.fence.renew(float(cmd["seconds"]))
                return {"ok": True, **self.fence.status()}
            if op == "fence":
                return {"ok": True, **self.fence.fence(float(cmd.get("drain", 5.0)))}
            if op == "drain":
                return {"ok": True, **self.fence.drain(float(cmd.get("timeout", 30.0)))}
            if op == "status":
                return {"ok": True, **self.fence.status()}
            if op == "shadows" and self.fence.replication is not None:
                wanted = [str(s) for s in cmd["shadows"]]
                try:
                    added = self.fence.replication.replicator.set_shadows(wanted)
                except (OSError, RuntimeError) as exc:  # a record not made, the loop closing
                    return {"ok": False, "error": f"cannot set the shadows: {exc}"}
                return {"ok": True, "added": added}
            return {"ok": False, "error": f"unknown op {op!r}"}
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": f"bad command: {exc}"}

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def command(path: Path, cmd: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send CMD to the control socket at PATH and return its answer (OSError if unreachable)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(cmd).encode() + b"\n")
        with sock.makefile("rb") as stream:
            line = stream.readline(MAX_LINE)
    if not line:
        raise OSError(errno.ECONNRESET, f"{path}: no answer")
    return json.loads(line)
