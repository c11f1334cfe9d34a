"""A replicated primary: the served volume's writes go to a Replicator, whose status is
published in the state folder for `shadowblk status --state-dir`.

The Replicator (shadowblk.delta.replicator) is plugged into the tracker as a WriteObserver. A
FencedError (a shadow holds a newer generation) fences the whole server: that write and every
later one fail with EIO, whatever the replicator would say later.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shadowblk.delta.replicator import FencedError, Replicator

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
PUBLISH_INTERVAL = 0.5
STALE_AFTER = 5.0  # seconds without a refresh after which a status file is not believed


class StatusUnavailable(Exception):
    """No running replicated server publishes its status in that folder."""


class ReplicationObserver:
    """The WriteObserver that feeds a Replicator and publishes its status."""

    def __init__(self, replicator: Replicator, state_dir: Path, url: str = "") -> None:
        self.replicator = replicator
        self.status_path = state_dir / STATUS_FILE
        self.url = url
        self.fenced = False
        self._stop = threading.Event()
        self._publisher = threading.Thread(
            target=self._publish_loop, name="replication-status", daemon=True
        )

    def start(self) -> None:
        """Connect to the shadows (in the background) and start publishing the status."""
        self.replicator.start()
        self.publish()
        self._publisher.start()

    # --- WriteObserver -----------------------------------------------------------------------

    def on_write(self, offset: int, data: bytes) -> None:
        self._guard(self.replicator.on_write, offset, data)

    def on_writes(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """A batch of WRITEs (the native loop's), captured under one lock."""
        self._guard(self.replicator.on_writes, writes)

    def on_zero(self, offset: int, length: int) -> None:
        self._guard(self.replicator.on_zero, offset, length)

    def on_trim(self, offset: int, length: int) -> None:
        self._guard(self.replicator.on_trim, offset, length)

    def on_flush(self) -> None:
        self.replicator.flush()

    def _guard(self, call: Any, *args: Any) -> None:
        if self.fenced:
            raise FencedError("this primary is fenced: a shadow holds a newer generation")
        try:
            call(*args)
        except FencedError:
            if not self.fenced:
                log.error("fenced by a shadow with a newer generation: refusing every write")
            self.fenced = True
            raise

    # --- status ------------------------------------------------------------------------------

    def publish(self, running: bool = True) -> None:
        """Write the status file atomically (temp file, rename): readers never see half."""
        doc = {
            "pid": os.getpid(),
            "url": self.url,
            "running": running,
            "updated": time.time(),
            **self.replicator.status(),
        }
        doc["fenced"] = doc["fenced"] or self.fenced
        tmp = self.status_path.with_name(f".{STATUS_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.status_path)

    def _publish_loop(self) -> None:
        while not self._stop.wait(PUBLISH_INTERVAL):
            try:
                self.publish()
            except OSError as exc:
                log.warning("cannot publish the replication status: %s", exc)

    def close(self, drain_timeout: float) -> None:
        """After the last request: give the shadows DRAIN_TIMEOUT seconds to apply everything,
        then stop shipping (what they still lack is persisted for the next start)."""
        if not (self.fenced or self.replicator.fenced) and not self.replicator.drain(drain_timeout):
            log.warning(
                "shadows not drained within %.0f s: they resync at the next start", drain_timeout
            )
        self._stop.set()
        if self._publisher.is_alive():
            self._publisher.join()
        self.publish(running=False)
        self.replicator.close()


def read_status(state_dir: Path) -> dict[str, Any]:
    """The status a running replicated server publishes in STATE_DIR; StatusUnavailable with
    the reason (no file, server stopped, stale file and its age) otherwise."""
    path = state_dir / STATUS_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise StatusUnavailable(
            f"{path} does not exist: no replicated `shadowblk serve` has used {state_dir}"
        ) from None
    except (OSError, ValueError) as exc:
        raise StatusUnavailable(f"{path}: unreadable ({exc})") from None
    age = time.time() - float(doc.get("updated", 0))
    if not doc.get("running"):
        raise StatusUnavailable(f"no server is running on {state_dir}: it stopped {age:.0f} s ago")
    if age > STALE_AFTER or not _alive(int(doc.get("pid", 0))):
        raise StatusUnavailable(
            f"no server is running on {state_dir}: its status file is {age:.0f} s old "
            f"(pid {doc.get('pid')} gone or hung)"
        )
    doc["age_seconds"] = round(age, 3)
    return doc


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
