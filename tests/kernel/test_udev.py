"""udev/90-shadowblk.rules and the agent's pyudev watcher, with the host's systemd-udevd running
in the guest (real uevents of real dm devices and GPT partitions): the rule tags sbk-* devices
and no others, the watcher reports them, the rule's RUN hands a removed one to the agent's
control endpoint (`shadowblk notify-device`), and the removal of a primary's device makes the
agent ask a real manager (on the host) for that volume's emergency switchover, once."""

import json

import pytest

from tests.kernel.lab_run import LabRun


def _result(lab: LabRun) -> dict:
    rc, log = lab.part("udev")
    assert rc == 0, log
    return json.loads((lab.result.outdir / "udev" / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sbk-vol1", "sbk-vol2"])
def test_rule_tags_a_tagged_device(lab: LabRun, name: str) -> None:
    lines = _result(lab)[f"test_{name}"]
    assert f"SHADOWBLK_NAME={name}" in lines
    tags = next(x for x in lines if x.startswith("TAGS="))
    assert ":shadowblk:" in tags and ":systemd:" in tags


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain1", "plain2"])
def test_rule_leaves_other_devices_alone(lab: LabRun, name: str) -> None:
    lines = _result(lab)[f"test_{name}"]
    assert not any(x.startswith("SHADOWBLK") for x in lines)
    assert not any(":shadowblk:" in x for x in lines)


@pytest.mark.slow
def test_watcher_reports_add_change_remove_and_the_lost_primary(lab: LabRun) -> None:
    result = _result(lab)
    assert result["saw_add"] and result["saw_change"] and result["saw_remove"]
    assert result["saw_partition_change"]
    names = {name for _, name, _ in result["events"]}
    assert names <= {"sbk-vol1", "sbk-vol2"}  # never plain1 or plain2
    assert result["lost"] == ["vol1"]


@pytest.mark.slow
def test_the_rule_hands_a_removed_device_to_the_agent(lab: LabRun) -> None:
    result = _result(lab)
    assert result["notified_remove"]
    (notified,) = result["notified"]  # never plain1, nothing but the removal
    assert notified[:2] == ["remove", "sbk-vol1"] and notified[2].startswith("/dev/dm-")


@pytest.mark.slow
def test_a_lost_primary_reaches_the_manager_once(lab: LabRun) -> None:
    """The manager's own answer: vol1's primary is s1 (the guest's "agent"), and no shadow of it
    could be promoted (the lab's manager has none serving): so it planned the takeover of the
    right volume for the right server, and said why it could not."""
    result = _result(lab)
    assert len(result["started"]) == 1  # the watcher's report and the rule's: the first counts
    assert result["manager_answers"] == []
    refusals = result["manager_refusals"]
    assert list(refusals) == ["vol1"]
    assert "no shadow that can be promoted now" in refusals["vol1"]
    assert "HTTP 409" in refusals["vol1"]
