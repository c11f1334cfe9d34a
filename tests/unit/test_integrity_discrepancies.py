"""The discrepancy log: durable JSON lines that readers get back, torn lines skipped."""

import json
import logging
from pathlib import Path

from shadowblk.integrity.discrepancies import Discrepancy, DiscrepancyLog


def record(offset: int, side: str = "shadow") -> Discrepancy:
    return Discrepancy(
        server="s1",
        volume="vol",
        offset=offset,
        block_size=4096,
        side=side,
        kind="data",
        repaired=True,
        expected_crc=1,
        actual_crc=2,
    )


def test_records_round_trip_and_carry_the_block(tmp_path: Path) -> None:
    log = DiscrepancyLog.in_state_dir(tmp_path / "state")
    assert log.append([record(8192), record(4096, "primary")]) == 2
    assert log.append([]) == 0
    log.append([record(0)])
    assert [(r.offset, r.side, r.block) for r in log.read()] == [
        (8192, "shadow", 2),
        (4096, "primary", 1),
        (0, "shadow", 0),
    ]
    first = json.loads(log.path.read_text().splitlines()[0])
    assert first["block"] == 2 and first["server"] == "s1" and first["time"] > 0


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    log = DiscrepancyLog(tmp_path / "d.jsonl")
    log.append([record(0), record(4096)])
    with log.path.open("ab") as f:
        f.write(b'{"server": "s1", "vol')
    with caplog.at_level(logging.WARNING):
        assert [r.offset for r in log.read()] == [0, 4096]
    assert "unreadable record" in caplog.text


def test_no_log_yet_reads_as_empty(tmp_path: Path) -> None:
    assert list(DiscrepancyLog(tmp_path / "none.jsonl").read()) == []
