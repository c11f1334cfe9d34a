"""`shadowblk scrub` as a real process on real files with bytes flipped on disk: exit codes
for cron, attribution, read-repair, the record, and maps that are missing or truncated."""

import json
import os
import pty
import subprocess
from contextlib import suppress
from pathlib import Path

from shadowblk.integrity.checksum_map import ChecksumMap
from tests.procs import SHADOWBLK
from tests.unit.test_integrity_scrub import BS, SIZE, flip, make_pair


def scrub(folder: Path, *extra: str, peer: bool = True) -> subprocess.CompletedProcess:
    args = ["scrub", "--image", str(folder / "primary.img"), "--map", str(folder / "primary.map")]
    if peer:
        args += [
            "--peer-image",
            str(folder / "shadow.img"),
            "--peer-map",
            str(folder / "shadow.map"),
        ]
    return subprocess.run([*SHADOWBLK, *args, *extra], capture_output=True, text=True, timeout=120)


def test_exit_codes_attribution_and_repair(tmp_path: Path) -> None:
    paths = make_pair(tmp_path)
    assert scrub(tmp_path).returncode == 0

    flip(paths["shadow"], 4 * BS + 1)
    found = scrub(tmp_path, "--json")
    assert found.returncode == 2, found.stderr
    report = json.loads(found.stdout)
    assert [(d["block"], d["side"], d["repaired"]) for d in report["discrepancies"]] == [
        (4, "shadow", False)
    ]

    flip(paths["primary"], SIZE - 3)
    repaired = scrub(tmp_path, "--repair", "--rate", "500", "--server", "storage-7")
    assert repaired.returncode == 1, repaired.stderr
    assert "shadow data, repaired" in repaired.stdout
    assert "primary data, repaired" in repaired.stdout
    assert paths["primary"].read_bytes() == paths["shadow"].read_bytes()
    assert scrub(tmp_path).returncode == 0

    lines = (tmp_path / "discrepancies.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["side"], r["block"], r["repaired"], r["server"]) for r in records[1:]] == [
        ("shadow", 4, True, "storage-7"),
        ("primary", (SIZE - 1) // BS, True, "storage-7"),
    ]


def test_single_image_without_a_peer_cannot_repair(tmp_path: Path) -> None:
    paths = make_pair(tmp_path)
    flip(paths["primary"], 10)
    out = scrub(tmp_path, "--repair", peer=False)
    assert out.returncode == 2
    assert "primary data, NOT repaired" in out.stdout


def test_missing_map_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    make_pair(tmp_path)
    (tmp_path / "shadow.map").unlink()
    out = scrub(tmp_path)
    assert out.returncode == 0
    assert "rebuilding it from the data" in out.stderr and "missing" in out.stderr
    assert (tmp_path / "shadow.map").stat().st_size == 4096 + 4 * (SIZE // BS)


def test_truncated_map_is_never_trusted(tmp_path: Path) -> None:
    """The primary's map is torn and its data rotted: the rebuilt map cannot tell rot from a
    newer write, so the block is reported unresolved and neither side is overwritten."""
    paths = make_pair(tmp_path)
    with (tmp_path / "primary.map").open("r+b") as f:
        f.truncate(5000)
    flip(paths["primary"], 6 * BS)
    before = paths["shadow"].read_bytes()
    out = scrub(tmp_path, "--repair", "--json")
    assert "truncated" in out.stderr
    assert out.returncode == 2
    report = json.loads(out.stdout)
    assert [(d["block"], d["kind"]) for d in report["discrepancies"]] == [(6, "unresolved")]
    assert "rebuilt" in report["discrepancies"][0]["detail"]
    assert paths["shadow"].read_bytes() == before


def test_peer_options_go_together(tmp_path: Path) -> None:
    make_pair(tmp_path)
    out = subprocess.run(
        [
            *SHADOWBLK,
            "scrub",
            "--image",
            str(tmp_path / "primary.img"),
            "--map",
            str(tmp_path / "primary.map"),
            "--peer-image",
            str(tmp_path / "shadow.img"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "go together" in out.stderr


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    make_pair(tmp_path)
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [
            *SHADOWBLK,
            "scrub",
            "--image",
            str(tmp_path / "primary.img"),
            "--map",
            str(tmp_path / "primary.map"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=follower,
    ) as proc:
        os.close(follower)
        assert proc.wait(timeout=60) == 0
    shown = b""
    with suppress(OSError):  # EIO once the terminal's other end is closed and drained
        while chunk := os.read(leader, 4096):
            shown += chunk
    os.close(leader)
    assert b"scrub" in shown and b"100%" in shown


def test_copies_of_different_volumes_are_refused_with_exit_2(tmp_path: Path) -> None:
    paths = make_pair(tmp_path)
    with paths["shadow"].open("ab") as f:
        f.write(bytes(BS))
    (tmp_path / "shadow.map").unlink()
    out = scrub(tmp_path)
    assert out.returncode == 2
    assert "not copies of one volume" in out.stderr


def test_map_held_by_a_writer_is_refused_with_exit_2(tmp_path: Path) -> None:
    make_pair(tmp_path)
    with ChecksumMap.load(tmp_path / "shadow.map", writable=True):  # a server applying deltas
        out = scrub(tmp_path)
    assert out.returncode == 2
    assert "open for writing by another process" in out.stderr
