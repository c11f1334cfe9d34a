"""The persisted state of one shadow volume: DIR/<volume>.state, JSON, replaced atomically.

It is the shadow's only claim about its image: the image equals the primary at the end of
`last_applied` (0: no epoch applied yet; the image content is then not a valid state).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from shadowblk.delta.journal import fsync_dir

VOLUME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class StateFileError(Exception):
    """A state file that cannot be trusted; the volume is not served until an operator looks."""


@dataclass
class VolumeState:
    volume_id: str
    size: int
    block_size: int
    generation: int
    last_applied: int

    def save(self, path: Path) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(asdict(self), out, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path) -> VolumeState:
        try:
            raw = json.loads(path.read_text())
            state = cls(
                str(raw["volume_id"]),
                int(raw["size"]),
                int(raw["block_size"]),
                int(raw["generation"]),
                int(raw["last_applied"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateFileError(f"{path}: unreadable state ({exc})") from None
        if not VOLUME_ID.match(state.volume_id) or path.name != f"{state.volume_id}.state":
            raise StateFileError(f"{path}: names volume {state.volume_id!r}")
        return state
