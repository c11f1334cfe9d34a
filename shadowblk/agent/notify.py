"""How a local program (the udev rule's RUN, through `shadowblk notify-device`) reaches the
agent: the agent writes RUN_DIR/agent.json (mode 0600: its control address and a token made at
start, good for POST /v1/devices only); the notifier reads it and posts the device event.
RUN_DIR is /run/shadowblk, or $SHADOWBLK_RUN_DIR (given to both; udev's RUN passes no
environment of its own).

The standard library only: udev runs the notifier for every removed tagged device, and it must
start and end quickly (udev kills a RUN program that takes too long).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

RUN_DIR = Path(os.environ.get("SHADOWBLK_RUN_DIR", "/run/shadowblk"))
RUN_FILE = "agent.json"
TIMEOUT_S = 10.0


class NotifyError(Exception):
    """The agent could not be told: no run file, not listening, or it refused."""


def publish(run_dir: Path, control_address: str, token: str) -> None:
    """Write RUN_DIR/agent.json for local notifiers: where to call, with which TOKEN."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"control": control_address, "token": token, "pid": os.getpid()}, f)
    os.replace(tmp, run_dir / RUN_FILE)


def unpublish(run_dir: Path) -> None:
    """Remove RUN_DIR/agent.json if it is this process's."""
    path = run_dir / RUN_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def notify(run_dir: Path, action: str, name: str, devnode: str | None) -> dict[str, Any]:
    """Tell the agent of RUN_DIR that device NAME (sbk-VOLUME) had ACTION; its answer."""
    try:
        doc = json.loads((run_dir / RUN_FILE).read_text())
        address, token = doc["control"], doc["token"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NotifyError(f"no agent to notify ({run_dir / RUN_FILE}: {err})") from None
    body = json.dumps({"action": action, "name": name, "devnode": devnode}).encode()
    request = urllib.request.Request(f"http://{address}/v1/devices", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as err:
        with err:
            raise NotifyError(f"the agent at {address} refused: {err.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise NotifyError(f"the agent at {address} did not answer: {err}") from None
