"""Run a shell script inside a QEMU guest booted on the stock Debian kernel (TCG).

The guest has device-mapper, dm-era, NBD, loop and 9p; the disks given are its /dev/vda,
/dev/vdb, ... in order; whatever the script writes under /out lands in OUTDIR on the host (9p);
with host ports, the guest reaches the host's loopback at 10.0.2.2 (QEMU user networking).
"""

import gzip
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.kernel_lab.initramfs import Kernel, base_initramfs, installed_kernel

HOST_IP = "10.0.2.2"
QBOOT = Path("/usr/share/qemu/qboot.rom")


class GuestError(AssertionError):
    """The guest script failed, or the guest never reported its exit status."""


@dataclass(frozen=True)
class GuestResult:
    """What one guest run left behind."""

    rc: int | None  # the script's exit status; None when the guest never reported one
    console: str  # the serial console: kernel messages, /init's and the script's output
    outdir: Path  # the host side of the guest's /out
    seconds: float  # wall time from QEMU start to its exit
    boot_seconds: float | None  # wall time until /init was ready to run the script
    timed_out: bool

    def read(self, name: str) -> str:
        """The text of a file the guest wrote as /out/NAME."""
        return (self.outdir / name).read_text()

    def check(self) -> "GuestResult":
        """Raise GuestError with the console's tail unless the script exited 0."""
        if self.rc != 0:
            why = "timed out" if self.timed_out else f"rc={self.rc}"
            tail = "\n".join(self.console.splitlines()[-60:])
            raise GuestError(f"guest script {why} after {self.seconds:.1f}s; console:\n{tail}")
        return self


def _run_layer(
    workdir: Path, script: str, env: Mapping[str, str], files: Mapping[str, Path]
) -> Path:
    """An initramfs layer holding /klab/test.sh, /klab/env and FILES, appended to the base."""
    root = workdir / "layer"
    klab = root / "klab"
    klab.mkdir(parents=True)
    (klab / "test.sh").write_text(script)
    (klab / "test.sh").chmod(0o755)
    (klab / "env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    for name, src in files.items():
        shutil.copy(src, klab / name)
    listing = "\n".join(str(p.relative_to(root)) for p in sorted(root.rglob("*"))) + "\n"
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        input=listing.encode(),
        capture_output=True,
        cwd=root,
        check=True,
    ).stdout
    layer = workdir / "layer.cpio.gz"
    layer.write_bytes(gzip.compress(archive, 1))  # the kernel wants every layer compressed alike
    return layer


def qemu_argv(
    kernel: Kernel,
    initrd: Path,
    disks: Sequence[Path],
    outdir: Path,
    net: bool,
    host_root: bool,
    memory_mb: int,
    cpus: int,
    extra: Sequence[str],
    append: str = "",
) -> list[str]:
    """The QEMU command line: q35 under TCG (KVM hangs these guests here), serial on stdout;
    APPEND goes on the kernel's command line."""
    argv = [
        "qemu-system-x86_64",
        "-machine", "q35,accel=tcg",
        "-cpu", "max",
        "-m", str(memory_mb),
        "-smp", str(cpus),
        "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(kernel.image),
        "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 loglevel=4 {append}".strip(),
        "-fsdev", f"local,id=out,path={outdir},security_model=none",
        "-device", "virtio-9p-pci,fsdev=out,mount_tag=klabout",
    ]  # fmt: skip
    if QBOOT.exists():
        argv += ["-bios", str(QBOOT)]
    for disk in disks:
        argv += ["-drive", f"file={disk},format=raw,if=virtio,cache=writeback"]
    if net:
        argv += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
    if host_root:
        argv += [
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        ]  # fmt: skip
    return argv + list(extra)


def run_guest(
    script: str,
    disks: Sequence[Path],
    timeout: float,
    outdir: Path,
    host_ports: Mapping[str, int] | None = None,
    env: Mapping[str, str] | None = None,
    files: Mapping[str, Path] | None = None,
    host_root: bool = False,
    memory_mb: int = 512,
    cpus: int = 2,
    extra: Sequence[str] = (),
    append: str = "",
) -> GuestResult:
    """Boot a guest, run SCRIPT (a /bin/sh script) in it, power off; QEMU is killed at TIMEOUT.

    HOST_PORTS (name -> port on the host's 127.0.0.1) turns on networking and exports each NAME
    in the guest along with HOST=10.0.2.2. ENV is exported too; FILES are copied to /klab/NAME.
    HOST_ROOT mounts the host's / read-only on /host, for `klab-chroot CMD` (host userland).
    APPEND: more kernel arguments (e.g. `rcupdate.rcu_expedited=1`).
    """
    kernel = installed_kernel()
    base = base_initramfs(kernel)
    outdir.mkdir(parents=True, exist_ok=True)
    guest_env = {**(env or {})}
    if host_ports is not None:
        guest_env["HOST"] = HOST_IP
        guest_env.update({name: str(port) for name, port in host_ports.items()})
    with tempfile.TemporaryDirectory(prefix="klab-run-") as tmp:
        work = Path(tmp)
        initrd = work / "initrd"
        with open(initrd, "wb") as out:  # concatenated cpio archives are one initramfs
            for part in (base, _run_layer(work, script, guest_env, files or {})):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out)
        net = host_ports is not None
        argv = qemu_argv(kernel, initrd, disks, outdir, net, host_root, memory_mb, cpus, extra,
                         append)  # fmt: skip
        return _boot(argv, outdir, timeout)


def _boot(argv: list[str], outdir: Path, timeout: float) -> GuestResult:
    """Start QEMU, collect its console, end it by PID at TIMEOUT or on any error."""
    lines: list[str] = []
    ready: list[float] = []
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def collect() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.startswith("KLAB: ready") and not ready:
                ready.append(time.monotonic() - start)
            lines.append(line)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait()
        reader.join(5)
    seconds = time.monotonic() - start
    console = "\n".join(lines)
    (outdir / "console.log").write_text(console + "\n")
    return GuestResult(_exit_status(outdir, console), console, outdir, seconds,
                       ready[0] if ready else None, timed_out)  # fmt: skip


def _exit_status(outdir: Path, console: str) -> int | None:
    """The script's status from /out/rc, else from the console's KLAB_RC= line."""
    rc_file = outdir / "rc"
    if rc_file.exists() and rc_file.read_text().strip().isdigit():
        return int(rc_file.read_text())
    for line in reversed(console.splitlines()):
        if line.startswith("KLAB_RC=") and line[8:].strip().isdigit():
            return int(line[8:])
    return None
