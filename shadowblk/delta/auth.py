"""Who may speak on a delta stream: an HMAC-SHA256 shared key per frame, or mutual TLS.

The HMAC of every frame covers the session id (both peers' nonces), so a frame recorded on one
connection is worthless on another: replay across sessions fails authentication, replay inside
a session fails the sequence check.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from pathlib import Path

from shadowblk.delta.frames import NONCE_SIZE, TAG_SIZE

MIN_KEY_BYTES = 16


class AuthConfigError(Exception):
    """The key file or the TLS material cannot be used."""


def load_key(path: Path) -> bytes:
    """The shared secret: the file's bytes without surrounding whitespace, 16 bytes or more."""
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise AuthConfigError(f"cannot read the HMAC key file {path}: {exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise AuthConfigError(f"HMAC key in {path} is {len(key)} bytes, need {MIN_KEY_BYTES}+")
    return key


class Session:
    """The per-connection authentication state: the key (or None under TLS) and the session id."""

    def __init__(self, key: bytes | None, client_nonce: bytes, server_nonce: bytes = b"") -> None:
        self.key = key
        self.session_id = client_nonce + (server_nonce or bytes(NONCE_SIZE))

    def tag(self, header: bytes, payload: bytes) -> bytes:
        assert self.key is not None
        mac = hmac.new(self.key, self.session_id, hashlib.sha256)
        mac.update(header)
        mac.update(payload)
        return mac.digest()

    def verify(self, header: bytes, payload: bytes, tag: bytes) -> bool:
        return len(tag) == TAG_SIZE and hmac.compare_digest(self.tag(header, payload), tag)


def server_tls_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS 1.3 server that requires a client certificate signed by CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    _load(ctx, cert, key, ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS 1.3 client presenting CERT, trusting only servers signed by CA (no host name check:
    shadows are addressed by IP; the CA is private to the deployment)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    _load(ctx, cert, key, ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _load(ctx: ssl.SSLContext, cert: Path, key: Path, ca: Path) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise AuthConfigError(f"cannot load TLS material: {exc}") from None
