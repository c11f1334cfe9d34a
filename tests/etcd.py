"""A real etcd for tests: Debian's etcd-server on free loopback ports, data in a temp dir."""

import shutil
import time
import urllib.request
from pathlib import Path
from subprocess import Popen

from tests.procs import Processes, free_port


def start_etcd(procs: Processes, data_dir: Path, name: str = "etcd") -> tuple[Popen, str]:
    """Start one single-member etcd; return its process and client URL once it answers."""
    etcd = shutil.which("etcd")
    assert etcd, "etcd is missing: make deps installs Debian's etcd-server"
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    proc = procs.start(
        [
            etcd,
            "--name", name,
            "--data-dir", str(data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}",
            "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}",
        ],
        name=name,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"etcd exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(client + "/health", timeout=1) as reply:
                if b'"true"' in reply.read():
                    return proc, client
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("etcd did not become healthy within 20 s")
