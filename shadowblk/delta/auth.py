"""Who may speak on a delta stream: a 16-byte tag per frame (shared key), or mutual TLS.

Tags are keyed BLAKE2b or Poly1305 (see Session), both proper MACs and much faster than the
HMAC-SHA256 of protocol version 1 on CPUs without SHA instructions. The tag of every frame
covers the session id (both peers' nonces), so a frame recorded on one connection is worthless
on another: replay across sessions fails authentication, replay inside a session fails the
sequence check.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from pathlib import Path

from shadowblk.delta.frames import NONCE_SIZE, TAG_SIZE
from shadowblk.delta.poly1305 import KEY_SIZE, poly1305

MIN_KEY_BYTES = 16
POLY_MIN = 4096  # payload bytes from which a frame's tag is Poly1305


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


def derive(key: bytes, purpose: bytes) -> bytes:
    """A 64-byte BLAKE2b key for PURPOSE derived from a shared secret of any length."""
    return hashlib.blake2b(key, digest_size=64, person=b"shadowblk-" + purpose).digest()


class Session:
    """The per-connection authentication state: the key (or None under TLS) and the session id.
    The BLAKE2b states after the session id are computed once and copied for every frame.

    A frame with a payload under POLY_MIN bytes (every control frame) is tagged with keyed
    BLAKE2b over session id, header and payload. A bigger one is tagged with Poly1305 under a
    one-time key, BLAKE2b (another key) of session id and header: the header holds the
    sequence number, so no two different frames of a session share a key (a re-sent frame is
    the same bytes), and any change to the header changes the key. Poly1305 is the costly part
    and runs several times faster than BLAKE2b."""

    def __init__(self, key: bytes | None, client_nonce: bytes, server_nonce: bytes = b"") -> None:
        self.key = key
        self.session_id = client_nonce + (server_nonce or bytes(NONCE_SIZE))
        self._mac = self._keys = None
        if key is not None:
            sid = self.session_id
            self._mac = hashlib.blake2b(sid, key=derive(key, b"mac"), digest_size=TAG_SIZE)
            self._keys = hashlib.blake2b(sid, key=derive(key, b"poly"), digest_size=KEY_SIZE)

    def tag(self, header: bytes, payload: bytes) -> bytes:
        assert self._mac is not None and self._keys is not None
        if len(payload) < POLY_MIN:
            mac = self._mac.copy()
            mac.update(header)
            mac.update(payload)
            return mac.digest()
        keys = self._keys.copy()
        keys.update(header)
        return poly1305(keys.digest(), payload)

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
