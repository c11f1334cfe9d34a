"""Bad command lines for `shadowblk serve` get a clear error and touch nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.procs import SHADOWBLK


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SHADOWBLK, "serve", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/missing.img"], "does not exist (give --size"),
        (["{tmp}"], "is a directory"),
        (["{tmp}/vol.img", "--size", "2M"], "not the --size"),
        (["{tmp}/vol.img", "--listen", "localhost"], "is not HOST:PORT"),
        (["{tmp}/vol.img", "--size", "lots"], "is not a size"),
        (["{tmp}/vol.img", "--block-size", "1000"], "power of two"),
        (["{tmp}/vol.img", "--tls-cert", "{tmp}/vol.img"], "--tls-cert and --tls-key go together"),
        (
            ["{tmp}/vol.img", "--tls-cert", "{tmp}/vol.img", "--tls-key", "{tmp}/vol.img"],
            "cannot load TLS material",
        ),
        (["{tmp}/vol.img", "--state-dir", "{tmp}/state"], "tracks a volume with geometry"),
    ],
)
def test_bad_input_is_refused_clearly(tmp_path: Path, args: list[str], message: str) -> None:
    image = tmp_path / "vol.img"
    image.write_bytes(b"\x5a" * (1 << 20))
    state = tmp_path / "state"
    state.mkdir()
    (state / "volume.json").write_text('{"size": 4096, "block_size": 4096, "region_size": 4096}')
    result = serve(*(a.format(tmp=tmp_path) for a in args))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # never a ready line
    assert image.read_bytes() == b"\x5a" * (1 << 20)
    assert not (tmp_path / "missing.img").exists()
