"""The kernel lab: real kernel paths (device-mapper, dm-era, NBD) tested in a QEMU guest."""

from tools.kernel_lab.guest import GuestError, GuestResult, run_guest
from tools.kernel_lab.initramfs import KernelLabError

__all__ = ["GuestError", "GuestResult", "KernelLabError", "run_guest"]
