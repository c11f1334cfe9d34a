"""A dm-linear table swap in the guest, under a running O_DIRECT writer, loses nothing."""

import pytest

from tests.kernel.lab_run import LabRun

MIB = 1 << 20


def pattern(p: int) -> bytes:
    """The guest writer's pass pattern: 256 blocks, each headed 'pass P block B'."""
    return b"".join(f"pass {p} block {i}".ljust(4095).encode() + b"\n" for i in range(256))


@pytest.mark.slow
def test_swap_under_writer_keeps_every_write(lab: LabRun) -> None:
    rc, log = lab.part("swap")
    assert rc == 0, log
    result = dict(
        line.split("=", 1)
        for line in (lab.result.outdir / "swap" / "result").read_text().split("\n")
        if "=" in line
    )
    passes = int(result["passes"])
    assert passes >= 2
    assert result["table"].endswith(":80 0")  # now over vdf (virtio minors go 16 per disk)
    # the host file behind the new disk holds the writer's last pass and the pre-swap marker
    new = lab.images["swap_new"].read_bytes()[: 17 * MIB]
    assert new[:MIB] == pattern((passes - 1) % 2)
    assert new[16 * MIB : 16 * MIB + 24] == b"written-before-the-swap\n"
    paused = int(result["paused_us"]) - int(result["copy_us"])
    print(f"swap pause without the copy: {paused / 1000:.0f} ms; {result}")
    assert 0 < paused < 60_000_000
