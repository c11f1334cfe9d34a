"""`shadowblk attach` repointed under fio load between two real NBD servers on one file.

The two upstreams are `shadowblk serve` and `nbdkit file cache=none` exporting the same backing
file: both go through the one kernel page cache, so what one acknowledged the other reads, and a
repoint between them must be invisible to fio's verification. fio's nbd engine is the VM's
client; the test drives the router's control endpoint as the manager would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from shadowblk.nbd import protocol as P
from shadowblk.nbd.client import NBDClient
from tests.procs import SHADOWBLK, Processes, free_port

SIZE = "64M"


def start_serve(procs: Processes, image: Path, name: str = "vol") -> tuple[subprocess.Popen, str]:
    """`shadowblk serve` on IMAGE (created if missing); its process and nbd:// URI."""
    argv = [*SHADOWBLK, "serve", str(image), "--listen", "127.0.0.1:0", "--name", name]
    proc = procs.start([*argv, "--size", SIZE], f"serve-{image.name}")
    return proc, procs.wait_ready(proc).split()[1]


def start_nbdkit(procs: Processes, image: Path, name: str = "vol") -> tuple[subprocess.Popen, str]:
    """`nbdkit file` on IMAGE; nbdkit prints no ready line, so wait until its port answers."""
    return procs.start_nbdkit(["-e", name, "file", str(image), "cache=none"], name)


def start_attach(
    procs: Processes, upstream: str, *extra: str, volume: str = "vol"
) -> tuple[subprocess.Popen, str, str]:
    """The router in front of UPSTREAM: its process, its nbd:// URI and its control URL."""
    control = f"127.0.0.1:{free_port()}"
    argv = [*SHADOWBLK, "-v", "attach", volume, "--listen", "127.0.0.1:0"]
    proc = procs.start([*argv, "--upstream", upstream, "--control", control, *extra], "attach")
    line = procs.wait_ready(proc)
    uri = line.split()[1]
    assert line == f"ready {uri}" and uri.endswith(f"/{volume}")
    return proc, uri, f"http://{control}"


def control(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """One call on the control endpoint: (HTTP status, JSON answer)."""
    request = urllib.request.Request(url + path, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.load(err)


def repoint(url: str, uri: str, generation: int) -> tuple[int, dict]:
    return control(
        url, "POST", "/repoint", json.dumps({"uri": uri, "generation": generation}).encode()
    )


def fio(cwd: Path, uri: str, *extra: str, name: str = "job") -> subprocess.Popen:
    """fio's nbd engine against URI, JSON results in CWD/NAME.json (cwd: its verify state)."""
    argv = [
        "fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--bs=4k", "--iodepth=16",
        "--size=64M", "--rw=randwrite", "--verify=crc32c", "--verify_fatal=1", "--randseed=7",
        "--output-format=json", f"--output={cwd / (name + '.json')}", *extra,
    ]  # fmt: skip
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def fio_result(cwd: Path, proc: subprocess.Popen, name: str = "job") -> dict:
    """Wait for fio; assert it exited 0 with no I/O or verify error; its job's results."""
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"fio failed ({proc.returncode}): {err.decode()}"
    job = json.loads((cwd / f"{name}.json").read_text())["jobs"][0]
    assert job["error"] == 0, job
    return job


class Repointer(threading.Thread):
    """Repoints the router between UPSTREAMS, with a rising generation, while fio runs."""

    def __init__(self, url: str, upstreams: list[str], start_gen: int, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.upstreams, self.gen, self.every = url, upstreams, start_gen, every
        self.results: list[dict] = []
        self.failures: list[tuple[int, dict]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.gen += 1
            status, answer = repoint(self.url, self.upstreams[self.gen % 2], self.gen)
            (self.results if status == 200 else self.failures).append(answer)


def test_fio_verifies_across_repoints(procs: Processes, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    _, serve_uri = start_serve(procs, image)
    _, kit_uri = start_nbdkit(procs, image)
    attach, uri, ctl = start_attach(procs, serve_uri, "--generation", "1")

    generation = 1
    for phase, extra in (("write", []), ("verify", ["--verify_only"])):
        mover = Repointer(ctl, [serve_uri, kit_uri], start_gen=generation, every=0.03)
        job = fio(tmp_path, uri, *extra, name=phase)
        mover.start()
        result = fio_result(tmp_path, job, name=phase)
        mover.stop.set()
        mover.join()
        assert not mover.failures, mover.failures
        assert len(mover.results) >= 5, f"only {len(mover.results)} repoints during {phase}"
        assert any(r["queued"] for r in mover.results), "no request ever waited at the gate"
        assert result["read"]["io_bytes"] == 64 << 20  # every block read back and verified
        generation = mover.gen
    status = control(ctl, "GET", "/status")[1]
    assert status["errors"] == 0 and status["expired"] == 0, status
    assert status["repoints"] >= 11 and status["generation"] == generation
    assert attach.poll() is None


def test_kill9_upstream_then_repoint_within_hold_time(procs: Processes, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    serve, serve_uri = start_serve(procs, image)
    _, kit_uri = start_nbdkit(procs, image)
    _, uri, ctl = start_attach(procs, serve_uri, "--generation", "1", "--hold-time", "30")
    job = fio(tmp_path, uri)
    deadline = time.monotonic() + 30
    while control(ctl, "GET", "/status")[1]["requests"] < 500:  # fio is writing
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.01)
    # stopped first, so that requests are surely in flight on it when it dies
    serve.send_signal(signal.SIGSTOP)
    while control(ctl, "GET", "/status")[1]["in_flight"] == 0:
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.01)
    procs.stop(serve, signal.SIGKILL)
    assert job.poll() is None, "fio ended before the upstream was killed"
    time.sleep(1.0)  # requests are held meanwhile
    status = control(ctl, "GET", "/status")[1]
    assert status["paused"] and not status["upstream_alive"], status
    code, answer = repoint(ctl, kit_uri, 2)
    assert code == 200, answer
    assert answer["pause_ms"] >= 900  # the first held request waited for the repoint
    fio_result(tmp_path, job)
    status = control(ctl, "GET", "/status")[1]
    assert status["errors"] == 0 and status["upstream"] == kit_uri, status
    assert status["retries"] >= 1  # requests in flight at the kill were re-issued on nbdkit


def test_hold_time_expiry_gives_eio_then_recovers(procs: Processes, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    serve, serve_uri = start_serve(procs, image)
    _, kit_uri = start_nbdkit(procs, image)
    _, uri, ctl = start_attach(procs, serve_uri, "--hold-time", "1")
    procs.stop(serve, signal.SIGKILL)
    started = time.monotonic()
    read = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 4k", uri], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert "Input/output error" in read.stdout + read.stderr, read
    assert time.monotonic() - started >= 1.0
    assert control(ctl, "GET", "/status")[1]["expired"] >= 1
    assert repoint(ctl, kit_uri, 1)[0] == 200
    io = ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k", uri]
    write = subprocess.run(io, capture_output=True, text=True, timeout=60)
    assert write.returncode == 0 and "Pattern verification failed" not in write.stdout, write


def test_every_command_is_forwarded_across_a_repoint(procs: Processes, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    _, serve_uri = start_serve(procs, image)
    _, kit_uri = start_nbdkit(procs, image)
    _, uri, ctl = start_attach(procs, serve_uri)
    port = int(uri.rsplit(":", 1)[1].split("/")[0])
    with NBDClient("127.0.0.1", port, "vol") as client:
        client.pwrite(b"\x11" * 8192, 0, fua=True)
        client.pwrite(b"\x22" * 8192, 8192)
        client.zero(4096, 8192)
        client.trim(12288, 4096)
        client.flush()
        client.request(P.CMD_CACHE, 0, 16384)
        assert client.reply().error == 0
        before = client.pread(0, 16384)
        assert repoint(ctl, kit_uri, 1)[0] == 200
        assert client.pread(0, 16384) == before  # read from nbdkit now
        assert before[:4096] == b"\x11" * 4096 and before[4096:12288] == bytes(8192)
        client.pwrite(b"\x33" * 4096, 0, fua=True)
        assert repoint(ctl, serve_uri, 2)[0] == 200
        assert client.pread(0, 4096) == b"\x33" * 4096
    status = control(ctl, "GET", "/status")[1]
    assert status["errors"] == 0 and status["upstream"] == serve_uri, status
