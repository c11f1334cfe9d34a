"""The bearer token that every mutating request must carry.

The operator gives a token file (the same one to every manager sharing a store); without one
the manager generates a token into its state directory once and keeps using it, so agents and
the CLI configured with that file keep working across restarts.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from shadowblk.manager.api_errors import ApiError


class TokenError(Exception):
    """The token file is missing, unreadable or empty."""


def read_token(path: Path) -> str:
    """The token in PATH (surrounding whitespace ignored)."""
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise TokenError(f"cannot read the token file {path}: {err.strerror}") from None
    if not token:
        raise TokenError(f"the token file {path} is empty")
    return token


def generated_token(state_dir: Path) -> tuple[str, Path]:
    """The token kept in STATE_DIR/token, created (mode 0600) on first use."""
    path = state_dir / "token"
    if path.exists():
        return read_token(path), path
    state_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path


def require_bearer(header: str | None, token: str) -> None:
    """401 unless HEADER is `Bearer TOKEN`; compared in constant time."""
    if not header:
        raise ApiError(401, "this request changes state: it needs 'Authorization: Bearer TOKEN'")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "the Authorization header must be 'Bearer TOKEN'")
    if not hmac.compare_digest(given.strip().encode(errors="replace"), token.encode()):
        raise ApiError(401, "wrong bearer token")
