"""Mutual TLS instead of the HMAC key: a primary with a certificate from the deployment's CA is
served; one with a certificate from another CA, or none, is refused at the handshake."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from shadowblk.delta.auth import client_tls_context
from shadowblk.delta.replicator import Replicator
from tests.delta_driver import Driver, file_hash
from tests.pki import make_ca, make_leaf
from tests.procs import SHADOWBLK, Processes

SIZE = 4 << 20


def refused(ctx: ssl.SSLContext, port: int) -> bool:
    """Whether the shadow ends the connection without a byte for a client with CTX."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            tls = ctx.wrap_socket(raw)
            tls.sendall(b"x" * 100)
            return tls.recv(1) == b""
        except (ssl.SSLError, ConnectionError):
            return True


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_leaf(d, "ca", "shadow")
    make_leaf(d, "ca", "primary")
    make_leaf(d, "rogue-ca", "intruder")
    return d


def test_mutual_tls_stream(tmp_path: Path, procs: Processes, pki: Path) -> None:
    proc = procs.start(
        [
            *SHADOWBLK,
            "shadow",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "s"),
            "--tls-cert",
            str(pki / "shadow-cert.pem"),
            "--tls-key",
            str(pki / "shadow-key.pem"),
            "--tls-ca",
            str(pki / "ca-cert.pem"),
        ],
        "shadow",
    )
    port = int(procs.wait_ready(proc).rsplit(":", 1)[1])

    for cert in (
        "primary",
        "intruder",
        None,
    ):  # a foreign CA's certificate, then no certificate at all
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(pki / "ca-cert.pem")
        if cert:
            ctx.load_cert_chain(pki / f"{cert}-cert.pem", pki / f"{cert}-key.pem")
        # the deployment's primary gets an answer (an ERROR frame for its garbage); others none
        assert refused(ctx, port) == (cert != "primary"), cert

    driver = Driver(tmp_path / "primary.img", SIZE, seed=9)
    driver.prefill(10)
    tls = client_tls_context(pki / "primary-cert.pem", pki / "primary-key.pem", pki / "ca-cert.pem")
    rep = driver.attach(
        Replicator(
            "tlsvol",
            driver.fd,
            SIZE,
            [f"127.0.0.1:{port}"],
            tmp_path / "state",
            tls=tls,
            cut_interval=None,
        )
    )
    try:
        for _ in range(5):
            driver.write_some(10)
            driver.cut()
        assert rep.drain(60), rep.status()
    finally:
        driver.close()
    assert file_hash(tmp_path / "s" / "tlsvol.img") == file_hash(driver.path)
    assert proc.poll() is None
