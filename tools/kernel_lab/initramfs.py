"""The kernel and the cached base initramfs of the kernel lab.

The base initramfs is built once per kernel version and per version of the scripts in
tools/kernel-lab (their hash is part of the cache key), so editing any of them rebuilds it.
"""

import fcntl
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tools" / "kernel-lab"
BUILD_SCRIPT = SCRIPTS / "build-initramfs.sh"


class KernelLabError(RuntimeError):
    """The lab cannot run: no kernel installed, or the initramfs build failed."""


@dataclass(frozen=True)
class Kernel:
    """A stock Debian kernel image and the version its modules are installed under."""

    version: str
    image: Path


def cache_dir() -> Path:
    """Where built images live: $KLAB_CACHE, else .cache/kernel-lab in the checkout (ignored)."""
    path = Path(os.environ.get("KLAB_CACHE", REPO / ".cache" / "kernel-lab"))
    path.mkdir(parents=True, exist_ok=True)
    ignore = path / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return path


def installed_kernel() -> Kernel:
    """The newest kernel that has both /boot/vmlinuz-VERSION and /lib/modules/VERSION."""
    modules = Path("/lib/modules")
    names = [d.name for d in modules.iterdir()] if modules.is_dir() else []
    versions = sorted(
        (v for v in names if (Path("/boot") / f"vmlinuz-{v}").exists()),
        key=lambda v: [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", v)],
    )
    if not versions:
        raise KernelLabError("no kernel installed: apt-get install linux-image-amd64")
    version = versions[-1]
    return Kernel(version, Path("/boot") / f"vmlinuz-{version}")


def _recipe_hash() -> str:
    """A hash of everything the build puts together: the scripts in tools/kernel-lab."""
    digest = hashlib.sha256()
    for path in sorted(SCRIPTS.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def base_initramfs(kernel: Kernel) -> Path:
    """The base initramfs for KERNEL, built on first use (one builder at a time, by file lock)."""
    target = cache_dir() / f"base-{kernel.version}-{_recipe_hash()}.cpio.gz"
    if target.exists():
        return target
    with open(cache_dir() / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            done = subprocess.run(
                [str(BUILD_SCRIPT), kernel.version, str(target)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise KernelLabError(f"initramfs build failed:\n{done.stdout}{done.stderr}")
            for stale in cache_dir().glob("base-*.cpio.gz"):  # older kernels or recipes
                if stale != target:
                    stale.unlink()
    return target
