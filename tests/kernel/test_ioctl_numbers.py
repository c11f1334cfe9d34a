"""The ioctl numbers and layouts shadowblk.kernel builds with ioctl-opt, against the values of
the kernel's uapi headers (linux/dm-ioctl.h, linux/nbd.h), and the era status parser: what the
guest tests would only show as an EINVAL or ENOTTY."""

from shadowblk.kernel import dm, nbd
from shadowblk.tracking.dm_era.target import EraStatus


def test_device_mapper_ioctls_match_the_kernel_header() -> None:
    assert dm.HEADER.size == 312 and dm.SPEC.size == 40  # sizeof(struct dm_ioctl / dm_target_spec)
    assert dm._command(dm.VERSION_CMD) == 0xC138FD00  # DM_VERSION
    assert dm._command(dm.DEV_SUSPEND) == 0xC138FD06
    assert dm._command(dm.TABLE_LOAD) == 0xC138FD09
    assert dm._command(dm.TARGET_MSG) == 0xC138FD0E


def test_nbd_ioctls_match_the_kernel_header() -> None:
    assert (nbd.SET_SOCK, nbd.SET_BLKSIZE, nbd.DO_IT, nbd.CLEAR_SOCK) == (0xAB00, 0xAB01, 0xAB03,
                                                                          0xAB04)  # fmt: skip
    assert (nbd.SET_SIZE_BLOCKS, nbd.DISCONNECT, nbd.SET_TIMEOUT, nbd.SET_FLAGS) == (
        0xAB07, 0xAB08, 0xAB09, 0xAB0A)  # fmt: skip


def test_era_status_line() -> None:
    assert EraStatus.parse("8 15/2048 4 -") == EraStatus(15, 2048, 4, None)
    assert EraStatus.parse("8 62/2048 7 1033") == EraStatus(62, 2048, 7, 1033)
