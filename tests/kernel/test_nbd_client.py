"""The guest kernel's NBD client against NBD servers on the host's loopback."""

import hashlib

import pytest

from tests.kernel.lab_run import LabRun

MIB = 1 << 20


@pytest.mark.slow
@pytest.mark.parametrize("server", ["nbdkit", "shadowblk"])
def test_kernel_client_reads_and_writes(lab: LabRun, server: str) -> None:
    part = f"nbd_{server}"
    rc, log = lab.part(part)
    assert rc == 0, log
    out = lab.result.outdir / part
    assert (out / "marker").read_bytes() == lab.hosts_marker
    assert (out / "readback").read_text() == "written-by-the-guest\n"
    data = lab.servers[server].read_bytes()
    assert data[3 * 4096 : 3 * 4096 + 21] == b"written-by-the-guest\n"
    assert hashlib.md5(data[MIB : 9 * MIB]).hexdigest() == (out / "md5").read_text().strip()
    print(f"{server}: {(out / 'result').read_text().split()}")
