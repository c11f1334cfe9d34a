"""`shadowblk serve` driven by real NBD clients: qemu-img, qemu-io, nbdinfo, nbdcopy, nbdfuse
with a loop device and ext4, fio's nbd engine with verification. Nothing mocked on either side."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from tests.procs import SHADOWBLK, Processes

MiB = 1 << 20


def run(
    argv: list[str], timeout: float = 120, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a client to completion; on failure the assertion shows its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check:
        assert proc.returncode == 0, (
            f"{argv[0]} failed ({proc.returncode}): {proc.stderr}{proc.stdout}"
        )
    return proc


def start_serve(
    procs: Processes,
    tmp_path: Path,
    *extra: str,
    size: str = "64M",
    name: str = "vol",
    image: Path | None = None,
    state: bool = True,
) -> tuple[subprocess.Popen, str]:
    """Start `shadowblk serve` on a free port; returns the process and its nbd:// URL."""
    image = image or tmp_path / "vol.img"
    argv = [*SHADOWBLK, "-v", "serve", str(image), "--listen", "127.0.0.1:0", "--name", name]
    if size:
        argv += ["--size", size]
    if state:
        argv += ["--state-dir", str(tmp_path / "state")]
    proc = procs.start([*argv, *extra], "serve")
    line = procs.wait_ready(proc)
    url = line.split()[1]
    assert (
        line == f"ready {url}" and url.startswith("nbd://127.0.0.1:") and url.endswith(f"/{name}")
    )
    assert urlparse(url).port != 0
    return proc, url


def dirty_extents(state_dir: Path) -> list[tuple[int, int]]:
    out = run([*SHADOWBLK, "dirty", "--state-dir", str(state_dir), "--json"]).stdout
    return [tuple(e) for e in json.loads(out)["extents"]]


def nbd_opts(url: str) -> str:
    """qemu --image-opts for an nbd:// URL."""
    u = urlparse(url)
    return f"driver=nbd,host={u.hostname},port={u.port},export={u.path[1:]}"


def stop_clean(procs: Processes, proc: subprocess.Popen) -> None:
    assert procs.stop(proc, signal.SIGTERM) == 0


def test_qemu_img_info_convert_compare(procs: Processes, tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(3 * MiB) + bytes(5 * MiB) + os.urandom(MiB))
    proc, url = start_serve(procs, tmp_path, size="9M")
    info = json.loads(run(["qemu-img", "info", "--output=json", url]).stdout)
    assert info["virtual-size"] == 9 * MiB and info["format"] == "raw"

    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), url])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), url])
    out = tmp_path / "out.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", url, str(out)])
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out), str(source)])

    run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 4M 4k", url])
    differs = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), url], check=False)
    assert differs.returncode == 1, differs.stdout + differs.stderr
    stop_clean(procs, proc)
    # everything convert wrote plus the 4k: the tracker saw each write
    covered = dirty_extents(tmp_path / "state")
    assert any(o <= 4 * MiB and 4 * MiB + 4096 <= o + n for o, n in covered)
    assert any(o <= 0 and 3 * MiB <= o + n for o, n in covered)


def test_qemu_io_patterns_and_exact_tracking(procs: Processes, tmp_path: Path) -> None:
    proc, url = start_serve(procs, tmp_path)
    writes = [
        "write -P 0xa1 0 64k",
        "write -P 0xb2 1M 4k",
        "write -f -P 0xc3 8M 12k",  # FUA
        "write -z 20M 1M",  # write zeroes
        "write -P 0xd4 63M 1M",  # the last MiB
    ]
    reads = [
        "read -P 0xa1 0 64k",
        "read -P 0xb2 1M 4k",
        "read -P 0xc3 8M 12k",
        "read -P 0 20M 1M",
        "read -P 0xd4 63M 1M",
        "read -P 0 2M 1M",
    ]
    cmds = [arg for c in [*writes, "flush", *reads] for arg in ("-c", c)]
    out = run(["qemu-io", "-f", "raw", *cmds, url]).stdout
    assert "Pattern verification failed" not in out and out.count("read ") == len(reads)
    bad = run(["qemu-io", "-f", "raw", "-c", "read -P 0x55 0 4k", url], check=False).stdout
    assert "Pattern verification failed" in bad  # the check itself can fail
    stop_clean(procs, proc)
    assert dirty_extents(tmp_path / "state") == [
        (0, 64 * 1024),
        (MiB, 4096),
        (8 * MiB, 12 * 1024),
        (20 * MiB, MiB),
        (63 * MiB, MiB),
    ]


def test_nbdinfo_list_and_map_after_trim(procs: Processes, tmp_path: Path) -> None:
    proc, url = start_serve(procs, tmp_path, name="disk0")
    listing = run(["nbdinfo", "--list", "--json", url]).stdout
    exports = json.loads(listing)["exports"]
    assert [e["export-name"] for e in exports] == ["disk0"]
    assert exports[0]["export-size"] == 64 * MiB
    assert "base:allocation" in exports[0]["contexts"]

    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", url])
    mapped = json.loads(run(["nbdinfo", "--map", "--json", url]).stdout)
    assert mapped[0] == {"offset": 0, "length": 4 * MiB, "type": 0, "description": "data"}
    run(["qemu-io", "-f", "raw", "-c", "discard 1M 2M", url])
    mapped = json.loads(run(["nbdinfo", "--map", "--json", url]).stdout)
    kinds = [(m["offset"], m["length"], m["type"]) for m in mapped]
    assert kinds[:3] == [(0, MiB, 0), (MiB, 2 * MiB, 3), (3 * MiB, MiB, 0)]
    stop_clean(procs, proc)
    assert dirty_extents(tmp_path / "state") == [(0, 4 * MiB)]


def test_nbdcopy_in_and_out(procs: Processes, tmp_path: Path) -> None:
    data = os.urandom(16 * MiB)
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    src.write_bytes(data)
    proc, url = start_serve(procs, tmp_path, size="16M")
    run(["nbdcopy", str(src), url])
    run(["nbdcopy", url, str(back)])
    assert back.read_bytes() == data
    stop_clean(procs, proc)
    assert dirty_extents(tmp_path / "state") == [(0, 16 * MiB)]


def test_fio_randwrite_verify_crc32c(procs: Processes, tmp_path: Path) -> None:
    proc, url = start_serve(procs, tmp_path, size="32M")
    result = tmp_path / "fio.json"
    run(
        [
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={url}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
            f"--output={result}",
        ],
        cwd=tmp_path,  # fio leaves its verify state file in its working directory
    )
    job = json.loads(result.read_text())["jobs"][0]
    assert job["error"] == 0 and job["job options"]["ioengine"] == "nbd"
    assert job["write"]["io_bytes"] == 32 * MiB and job["read"]["io_bytes"] == 32 * MiB
    stop_clean(procs, proc)
    assert dirty_extents(tmp_path / "state") == [(0, 32 * MiB)]


@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    dev = run(["losetup", "--find", "--show", str(path)]).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def fuse_file(procs: Processes, mountdir: Path, url: str) -> Iterator[Path]:
    mountdir.mkdir()
    proc = procs.start(["nbdfuse", str(mountdir / "nbd"), url], "nbdfuse")
    target = mountdir / "nbd"
    try:
        deadline = time.monotonic() + 20
        while not (target.exists() and os.path.ismount(mountdir)):
            assert proc.poll() is None, "nbdfuse exited"
            assert time.monotonic() < deadline, "nbdfuse did not mount"
            time.sleep(0.05)
        yield target
    finally:
        subprocess.run(["fusermount3", "-u", str(mountdir)], check=False)
        procs.stop(proc)


def test_nbdfuse_loop_ext4(procs: Processes, tmp_path: Path) -> None:
    proc, url = start_serve(procs, tmp_path, size="128M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    files = {f"f{i}.bin": os.urandom(200_000 + i) for i in range(8)}
    with fuse_file(procs, tmp_path / "fuse", url) as target, loop_device(target) as dev:
        run(["mkfs.ext4", "-q", "-F", dev])
        run(["mount", dev, str(mnt)])
        try:
            for name, data in files.items():
                (mnt / name).write_bytes(data)
            run(["sync"])
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
        fsck = run(["e2fsck", "-f", "-n", dev])
        assert "clean" in fsck.stdout or fsck.returncode == 0
        run(["mount", "-o", "ro", dev, str(mnt)])
        try:
            assert {p.name: p.read_bytes() for p in mnt.glob("*.bin")} == files
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    stop_clean(procs, proc)
    assert dirty_extents(tmp_path / "state")  # mkfs and the files were tracked


def test_sigint_and_read_only(procs: Processes, tmp_path: Path) -> None:
    proc, url = start_serve(procs, tmp_path)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 8k", url])
    assert procs.stop(proc, signal.SIGINT) == 0
    assert dirty_extents(tmp_path / "state") == [(0, 8192)]
    proc, url = start_serve(procs, tmp_path, "--read-only", size="", state=False)
    out = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x42 0 8k", url]).stdout
    assert "Pattern verification failed" not in out
    refused = run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", url], check=False)
    assert refused.returncode != 0 or "failed" in refused.stdout + refused.stderr
    stop_clean(procs, proc)
    assert (tmp_path / "vol.img").read_bytes()[:8192] == b"\x42" * 8192
