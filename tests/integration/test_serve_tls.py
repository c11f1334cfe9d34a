"""NBD over TLS 1.3 (NBD_OPT_STARTTLS, x509) with qemu-img and nbdinfo, client certificates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.test_serve_clients import (
    dirty_extents,
    nbd_opts,
    run,
    start_serve,
    stop_clean,
)
from tests.pki import make_ca, make_leaf
from tests.procs import Processes

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, in the file names
    QEMU's tls-creds-x509 and libnbd's tls-certificates expect."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca", subject="test CA")
    make_leaf(d, "ca", "server",
              "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")  # fmt: skip
    make_leaf(d, "ca", "client", "extendedKeyUsage=clientAuth")
    client_only = d / "client-dir"
    client_only.mkdir()
    for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        os.link(d / name, client_only / name)
    ca_only = d / "ca-dir"
    ca_only.mkdir()
    os.link(d / "ca-cert.pem", ca_only / "ca-cert.pem")
    return d


def tls_args(pki: Path, verify_clients: bool = False) -> list[str]:
    args = ["--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem")]
    if verify_clients:
        args += ["--tls-ca", str(pki / "ca-cert.pem"), "--tls-verify-clients"]
    return args


def qemu_tls(creds_dir: Path, url: str) -> list[str]:
    return [
        "--object",
        f"tls-creds-x509,id=tls0,endpoint=client,dir={creds_dir}",
        "--image-opts",
        f"{nbd_opts(url)},tls-creds=tls0",
    ]


def nbds(url: str, creds_dir: Path) -> str:
    return url.replace("nbd://", "nbds://", 1) + f"?tls-certificates={creds_dir}"


def test_tls_qemu_img_and_nbdinfo(procs: Processes, tmp_path: Path, pki: Path) -> None:
    source = tmp_path / "src.raw"
    source.write_bytes(os.urandom(2 * MiB))
    proc, url = start_serve(procs, tmp_path, *tls_args(pki), size="2M")
    info = json.loads(run(["nbdinfo", "--json", nbds(url, pki / "ca-dir")]).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["TLS"] is True
    assert info["exports"][0]["export-size"] == 2 * MiB
    run(
        [
            "qemu-img",
            "convert",
            "-n",
            "-f",
            "raw",
            str(source),
            "--target-image-opts",
            *qemu_tls(pki / "ca-dir", url)[:2],
            f"{nbd_opts(url)},tls-creds=tls0",
        ]
    )
    creds, opts = qemu_tls(pki / "ca-dir", url)[:2], qemu_tls(pki / "ca-dir", url)[3]
    run(["qemu-img", "compare", *creds, "--image-opts", f"driver=file,filename={source}", opts])
    # without TLS the server refuses to reveal or serve anything
    plain = run(["nbdinfo", url], check=False)
    assert plain.returncode != 0 and "export-size" not in plain.stdout
    assert "opt_go" in plain.stderr  # NBD_REP_ERR_TLS_REQD to the GO
    stop_clean(procs, proc)
    assert dirty_extents(tmp_path / "state") == [(0, 2 * MiB)]


def test_tls_client_certificates(procs: Processes, tmp_path: Path, pki: Path) -> None:
    proc, url = start_serve(procs, tmp_path, *tls_args(pki, verify_clients=True), size="1M")
    ok = run(
        [
            "qemu-io",
            "-c",
            "write -P 0x33 0 4k",
            "-c",
            "read -P 0x33 0 4k",
            *qemu_tls(pki / "client-dir", url),
        ]
    ).stdout
    assert "Pattern verification failed" not in ok
    run(["nbdinfo", "--size", nbds(url, pki / "client-dir")])
    refused = run(["nbdinfo", "--size", nbds(url, pki / "ca-dir")], check=False)
    assert refused.returncode != 0  # no client certificate: the TLS handshake fails
    stop_clean(procs, proc)
    assert dirty_extents(tmp_path / "state") == [(0, 4096)]
