"""udev/90-shadowblk.rules and the agent's pyudev watcher, with the host's systemd-udevd running
in the guest (real uevents of real dm devices and GPT partitions): the rule tags sbk-* devices
and no others, the watcher reports them, and the removal of a primary's device calls the
emergency switchover hook."""

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
