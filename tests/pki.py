"""Test certificates made with the real openssl: CAs and leaf certificates in one folder, named
NAME-key.pem / NAME-cert.pem (the names QEMU's tls-creds-x509 and libnbd expect for ca, server
and client)."""

import subprocess
from pathlib import Path

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


def make_ca(d: Path, name: str, subject: str | None = None) -> None:
    """A self-signed CA NAME, valid two days."""
    _openssl(d, "req", "-x509", *EC_KEY, "-keyout", f"{name}-key.pem", "-out",
             f"{name}-cert.pem", "-days", "2", "-subj", f"/CN={subject or name}")  # fmt: skip


def make_leaf(d: Path, ca: str, name: str, extensions: str | None = None) -> None:
    """A certificate NAME signed by CA, with EXTENSIONS (openssl extfile lines) if given."""
    _openssl(d, "req", *EC_KEY, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
             "-subj", f"/CN={name}")  # fmt: skip
    extfile: list[str] = []
    if extensions is not None:
        (d / f"{name}.ext").write_text(extensions + "\n")
        extfile = ["-extfile", f"{name}.ext"]
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey",
             f"{ca}-key.pem", "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2",
             *extfile)  # fmt: skip
