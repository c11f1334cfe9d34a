"""Scrub on real files: bytes flipped on disk are found, attributed to the right side,
repaired from the good side and recorded; the reader honours its rate, O_DIRECT and progress."""

import mmap
import os
import time
from pathlib import Path

import crc32c
import numpy as np
import pytest

from shadowblk.integrity import crc_scan
from shadowblk.integrity.blockcrc import block_crc32c
from shadowblk.integrity.checksum_map import ChecksumMap
from shadowblk.integrity.crc_scan import checksum_file
from shadowblk.integrity.discrepancies import DiscrepancyLog
from shadowblk.integrity.scrub import ScanOptions, Side, scan, scrub_one, scrub_pair

BS = 4096
SIZE = 6 * (1 << 20) + 3 * BS


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    """Flip bits of one byte in place, behind every map's back (silent corruption)."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def make_pair(folder: Path, size: int = SIZE, epoch: int = 1) -> dict[str, Path]:
    """A primary image and an identical shadow image, each with its saved map."""
    paths = {}
    data = np.random.default_rng(5).bytes(size)
    for name in ("primary", "shadow"):
        image = folder / f"{name}.img"
        image.write_bytes(data)
        ChecksumMap.build(image, folder / f"{name}.map", BS, epoch=epoch).close()
        paths[name] = image
    return paths


def open_sides(paths: dict[str, Path], writable: bool) -> list[Side]:
    return [
        Side(name, img, ChecksumMap.open_or_rebuild(img.with_suffix(".map"), img, BS, writable))
        for name, img in paths.items()
    ]


def pair_scrub(paths: dict[str, Path], log: DiscrepancyLog, repair: bool):
    primary, shadow = open_sides(paths, writable=repair)
    with primary.map, shadow.map:
        return scrub_pair(primary, shadow, ScanOptions(), log, repair, server="s1")


@pytest.mark.parametrize("bad", ["primary", "shadow"])
def test_flipped_byte_is_found_attributed_repaired_and_recorded(tmp_path: Path, bad: str) -> None:
    paths = make_pair(tmp_path)
    good = "shadow" if bad == "primary" else "primary"
    flip(paths[bad], 5 * BS + 17)
    log = DiscrepancyLog(tmp_path / "d.jsonl")

    dry = pair_scrub(paths, log, repair=False)
    assert [(d.block, d.side, d.kind, d.repaired) for d in dry.discrepancies] == [
        (5, bad, "data", False)
    ]
    assert dry.exit_code == 2
    assert paths[bad].read_bytes() != paths[good].read_bytes()  # nothing written without --repair

    fixed = pair_scrub(paths, log, repair=True)
    assert [(d.block, d.side, d.repaired) for d in fixed.discrepancies] == [(5, bad, True)]
    assert fixed.exit_code == 1
    assert paths[bad].read_bytes() == paths[good].read_bytes()
    assert pair_scrub(paths, log, repair=False).exit_code == 0
    assert [(r.block, r.side, r.repaired, r.server) for r in log.read()] == [
        (5, bad, False, "s1"),
        (5, bad, True, "s1"),
    ]


def test_both_sides_rotted_in_different_blocks_are_both_repaired(tmp_path: Path) -> None:
    paths = make_pair(tmp_path)
    flip(paths["primary"], 0)
    flip(paths["shadow"], SIZE - 1)  # the last block
    report = pair_scrub(paths, DiscrepancyLog(tmp_path / "d.jsonl"), repair=True)
    last = (SIZE - 1) // BS
    assert [(d.block, d.side) for d in report.discrepancies] == [(0, "primary"), (last, "shadow")]
    assert report.exit_code == 1
    assert paths["primary"].read_bytes() == paths["shadow"].read_bytes()


def test_same_block_rotted_on_both_sides_is_unresolved_and_left_alone(tmp_path: Path) -> None:
    paths = make_pair(tmp_path)
    flip(paths["primary"], 3 * BS, 0x01)
    flip(paths["shadow"], 3 * BS, 0x02)
    before = {n: p.read_bytes() for n, p in paths.items()}
    report = pair_scrub(paths, DiscrepancyLog(tmp_path / "d.jsonl"), repair=True)
    assert [(d.block, d.side, d.kind, d.repaired) for d in report.discrepancies] == [
        (3, "both", "unresolved", False)
    ]
    assert report.exit_code == 2
    assert {n: p.read_bytes() for n, p in paths.items()} == before


def test_stale_shadow_is_brought_to_the_newer_epoch(tmp_path: Path) -> None:
    paths = make_pair(tmp_path, epoch=4)
    with (
        paths["primary"].open("r+b") as f,
        ChecksumMap.load(tmp_path / "primary.map", writable=True) as pmap,
    ):  # epoch 5 written on the primary only
        f.seek(7 * BS)
        f.write(b"new" * 100)
        f.flush()
        pmap.update(7 * BS, paths["primary"].read_bytes()[7 * BS : 8 * BS])
        pmap.set_epoch(5)
    report = pair_scrub(paths, DiscrepancyLog(tmp_path / "d.jsonl"), repair=True)
    assert [(d.block, d.side, d.kind, d.repaired) for d in report.discrepancies] == [
        (7, "shadow", "stale", True)
    ]
    assert paths["primary"].read_bytes() == paths["shadow"].read_bytes()
    with ChecksumMap.load(tmp_path / "shadow.map") as smap:
        assert smap.epoch == 5


def test_a_wrong_map_record_is_corrected_not_the_data(tmp_path: Path) -> None:
    paths = make_pair(tmp_path)
    with ChecksumMap.load(tmp_path / "shadow.map", writable=True) as smap:
        smap.crcs[9] ^= 0xFFFF
    data = paths["shadow"].read_bytes()
    report = pair_scrub(paths, DiscrepancyLog(tmp_path / "d.jsonl"), repair=True)
    assert [(d.block, d.side, d.kind) for d in report.discrepancies] == [(9, "shadow", "map")]
    assert paths["shadow"].read_bytes() == data
    assert pair_scrub(paths, DiscrepancyLog(tmp_path / "d.jsonl"), repair=False).exit_code == 0


def test_single_side_repairs_only_from_a_copy_that_matches_the_map(tmp_path: Path) -> None:
    paths = make_pair(tmp_path)
    flip(paths["primary"], 2 * BS + 5)
    log = DiscrepancyLog(tmp_path / "d.jsonl")
    side = open_sides({"primary": paths["primary"]}, writable=False)[0]
    shadow_bytes = paths["shadow"].read_bytes()
    with side.map:
        bad_copy = scrub_one(side, ScanOptions(), log, "s1", lambda off, n: bytes(n))
        assert [(d.block, d.repaired) for d in bad_copy.discrepancies] == [(2, False)]
        assert bad_copy.exit_code == 2
        good = scrub_one(side, ScanOptions(), log, "s1", lambda o, n: shadow_bytes[o : o + n])
        assert good.exit_code == 1
        assert scrub_one(side, ScanOptions(), log).exit_code == 0
    assert paths["primary"].read_bytes() == shadow_bytes


def test_scan_is_the_same_with_o_direct_and_reports_progress(tmp_path: Path) -> None:
    paths = make_pair(tmp_path)
    flip(paths["primary"], 100)
    flip(paths["primary"], SIZE - 10)
    side = open_sides({"primary": paths["primary"]}, writable=False)[0]
    with side.map:
        done: list[int] = []
        buffered = scan(side, ScanOptions(progress=done.append))
        direct = scan(side, ScanOptions(direct=True))
    assert sorted(buffered) == sorted(direct) == [0, (SIZE - 1) // BS]
    assert sum(done) == SIZE


def test_scan_keeps_to_its_rate(tmp_path: Path) -> None:
    paths = make_pair(tmp_path, size=12 << 20)
    side = open_sides({"primary": paths["primary"]}, writable=False)[0]
    rate = 8e6
    with side.map:
        started = time.monotonic()
        scan(side, ScanOptions(rate=rate))
        elapsed = time.monotonic() - started
    assert elapsed >= ((12 << 20) - rate) / rate * 0.95  # one second's burst, then the rate


@pytest.mark.parametrize(("workers", "direct"), [(1, False), (3, False), (2, True)])
def test_checksum_file_covers_an_odd_sized_file_zero_padded(
    tmp_path: Path, workers: int, direct: bool
) -> None:
    path = tmp_path / "odd.img"
    data = np.random.default_rng(2).bytes(37 * BS + 100)
    path.write_bytes(data)
    crcs = checksum_file(path, BS, chunk_size=2 * BS, workers=workers, direct=direct)
    padded = data + bytes(BS - 100)
    assert crcs.tolist() == [crc32c.crc32c(padded[i : i + BS]) for i in range(0, len(padded), BS)]
    with pytest.raises(ValueError, match="multiple"):
        checksum_file(path, BS, chunk_size=BS + 1)


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached(path: Path) -> bool:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as pages:
        return crc_scan._all_cached(pages, 1 << 20)


def test_cached_uncached_and_partly_cached_files_checksum_alike(tmp_path: Path) -> None:
    """Windows in the page cache are checksummed in place, others read with pread: the same
    crcs either way, the odd tail zero-padded."""
    path = tmp_path / "two-windows.img"
    data = np.random.default_rng(3).bytes(crc_scan.MAP_WINDOW + 5 * (1 << 20) + 100)
    path.write_bytes(data)
    padded = data + bytes(BS - 100)
    expected = block_crc32c(padded, BS).tolist()
    assert cached(path)
    warm = checksum_file(path, BS, drop_cache=False).tolist()
    _drop(path)  # as the scan does by default, too
    assert not cached(path)
    cold = checksum_file(path, BS).tolist()
    with open(path, "rb") as f:
        f.read(1 << 20)  # the first window now partly cached
    partly = checksum_file(path, BS, workers=1).tolist()
    assert warm == cold == partly == expected
