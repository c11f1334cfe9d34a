"""The agent counts what scrubs and verifies recorded in its primaries' discrepancy logs: new
complete lines only, per volume, cumulative, into the heartbeat."""

from pathlib import Path

from shadowblk.agent.discrepancy_feed import DiscrepancyFeed
from shadowblk.agent.metrics import AgentMetrics
from shadowblk.integrity.discrepancies import Discrepancy, DiscrepancyLog


def record(volume: str, block: int) -> Discrepancy:
    return Discrepancy("s1", volume, block * 4096, 4096, "primary", "data", True, 1, 2)


def counts(metrics: AgentMetrics) -> tuple[int, dict[str, int]]:
    health = metrics.health()
    per_volume = {n: v["checksum_discrepancies"] for n, v in health["volumes"].items()}
    return health["checksum_discrepancies"], per_volume


def test_new_records_are_counted_once_per_volume(tmp_path: Path) -> None:
    metrics = AgentMetrics()
    feed = DiscrepancyFeed(tmp_path, metrics)
    feed.poll()
    assert counts(metrics)[0] == 0
    v1 = DiscrepancyLog.in_state_dir(tmp_path / "v1.state")
    v1.append([record("v1", 1), record("v1", 2)])
    DiscrepancyLog.in_state_dir(tmp_path / "v2.state").append([record("v2", 7)])
    feed.poll()
    feed.poll()  # nothing new: nothing added
    assert counts(metrics) == (3, {"v1": 2, "v2": 1})
    with open(v1.path, "ab") as torn:  # a writer caught mid-line
        torn.write(b'{"server": "s1", "volu')
    feed.poll()
    assert counts(metrics)[0] == 3
    with open(v1.path, "ab") as torn:
        torn.write(b'me": "v1"}\n')
    feed.poll()
    assert counts(metrics)[0] == 4


def test_a_dropped_volume_is_forgotten(tmp_path: Path) -> None:
    metrics = AgentMetrics()
    feed = DiscrepancyFeed(tmp_path, metrics)
    log = DiscrepancyLog.in_state_dir(tmp_path / "v1.state")
    log.append([record("v1", 1)])
    feed.poll()
    log.path.unlink()
    feed.poll()
    assert feed.read_to == {}
    assert counts(metrics)[0] == 1
