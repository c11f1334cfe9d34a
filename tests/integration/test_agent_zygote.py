"""The agent's zygote: a pre-loaded process that becomes the `serve` it is handed.

Bad command lines are refused and it keeps waiting; a good one is answered and run in the same
process (its PID serves the export, which a real NBD client then writes and reads).
"""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

from shadowblk.nbd import fence
from tests.procs import Processes


def _listening(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the zygote did not listen"
        time.sleep(0.02)


def test_zygote_refuses_bad_input_then_becomes_the_serve_it_is_handed(
    tmp_path: Path, procs: Processes
) -> None:
    sock = tmp_path / "zygote.ctl"
    zygote = procs.start([sys.executable, "-m", "shadowblk.agent.zygote", str(sock)], "zygote")
    _listening(sock, zygote)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600  # bound so: never open to others
    bad_lines = ({"args": "serve"}, {"args": [1, 2]}, {"argv": []}, {"args": []},
                 {"args": ["scrub", "--all"]}, {"args": ["--help"]})  # fmt: skip
    for bad in bad_lines:
        answer = fence.command(sock, bad, 10)
        assert answer["ok"] is False and answer["error"], answer
    assert "only `serve`" in fence.command(sock, {"args": ["drain", "s1"]}, 10)["error"]
    image = tmp_path / "v.img"
    args = ["serve", str(image), "--listen", "127.0.0.1:0", "--name", "v", "--size", "4M"]
    assert fence.command(sock, {"args": args}, 10) == {"ok": True}
    url = procs.wait_ready(zygote).removeprefix("ready ")
    assert not sock.exists()  # one command line, then it is that serve
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 8192", "-c", "read -P 0x5a 4096 8192",
         url], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout + out.stderr
    assert image.read_bytes()[4096 : 4096 + 8192] == b"\x5a" * 8192
    assert zygote.poll() is None


def test_zygote_refuses_a_socket_folder_open_to_others(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    argv = [sys.executable, "-m", "shadowblk.agent.zygote", str(folder / "zygote.ctl")]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "0700" in out.stderr, out.stderr
    assert not (folder / "zygote.ctl").exists()
