"""TLS for NBD_OPT_STARTTLS: an x509 server context, TLS 1.3 only, optional client certificates."""

from __future__ import annotations

import ssl
from pathlib import Path


class TLSConfigError(Exception):
    """The certificate, key or CA files cannot be used."""


def server_context(
    cert: Path, key: Path, ca: Path | None = None, verify_clients: bool = False
) -> ssl.SSLContext:
    """The context every STARTTLS upgrade uses; checked once at start-up, not per client."""
    if verify_clients and ca is None:
        raise TLSConfigError("--tls-verify-clients needs --tls-ca to verify them against")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(cert), str(key))
        if ca is not None:
            ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load TLS material: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_clients else ssl.CERT_NONE
    return ctx
