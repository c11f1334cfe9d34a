"""I3 after a switchover: an old primary that comes back, or any sender of an older generation,
is refused everywhere: its own `serve` refuses writes (no lease: ESHUTDOWN), the shadows refuse
its stream (STALE_GENERATION, so its replicator fences it), and attach refuses to be repointed
to an older generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.agent_lab import agent_groups_fixture, serving, start_agent, wait_for  # noqa: F401
from tests.procs import SHADOWBLK, Processes
from tests.switchover_lab import start_attach, start_fleet


def write(uri: str, offset: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P 0x77 {offset} 4096", uri],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def refused(done: subprocess.CompletedProcess) -> bool:
    return done.returncode != 0 or "error" in (done.stdout + done.stderr).lower()


def test_a_stale_sender_is_refused_by_shadows_and_attach(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    fleet = start_fleet(procs, agent_groups, tmp_path)
    start_attach(procs, fleet)
    assert fleet.switchover(to="s2")["generation"] == 2
    wait_for(fleet.in_step, 60, "s1 a shadow of s2, in step")
    shadow_address = fleet.client.server("s1")["address"]
    state = tmp_path / "s1" / "shadows" / "v1.state"
    before = json.loads(state.read_text())
    assert before["generation"] == 2

    # a primary of generation 1 (an old primary restarted by hand) ships to s1's shadow server
    rogue = procs.start(
        [*SHADOWBLK, "serve", str(tmp_path / "rogue.img"), "--size", "64M", "--name", "v1",
         "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "rogue.state"),
         "--shadow", shadow_address, "--generation", "1",
         "--hmac-key-file", str(tmp_path / "hmac.key")],
        name="rogue",
    )  # fmt: skip
    uri = procs.wait_ready(rogue).removeprefix("ready ")
    wait_for(lambda: refused(write(uri)), 30, "the stale primary fenced by the shadow")
    assert json.loads(state.read_text())["generation"] == 2  # the shadow kept its generation
    assert "STALE_GENERATION" in (tmp_path / "s1.log").read_text()  # said by the shadow

    # attach: a repoint to the old generation is refused, the current upstream kept
    request = urllib.request.Request(
        fleet.control + "/repoint",
        data=json.dumps({"uri": uri, "generation": 1}).encode(),
        method="POST",
    )
    try:
        urllib.request.urlopen(request, timeout=10)
        raise AssertionError("attach took an older generation")
    except urllib.error.HTTPError as err:
        assert err.code == 409
    assert not refused(write(fleet.attach_uri))


def test_an_old_primary_back_after_an_emergency_never_accepts_a_write(
    procs: Processes, agent_groups: list[int], tmp_path: Path
) -> None:
    fleet = start_fleet(procs, agent_groups, tmp_path)
    port = json.loads((tmp_path / "s1" / "agent.json").read_text())["volumes"]["v1"]["port"]
    old_endpoint = f"nbd://127.0.0.1:{port}/v1"
    assert not refused(write(old_endpoint))
    os.killpg(fleet.agents["s1"].pid, signal.SIGKILL)
    wait_for(lambda: fleet.primary() == "s2", 30, "the emergency switchover to s2")

    # s1 comes back: its agent starts the old primary's `serve` again from agent.json, without
    # a lease (the manager grants none: s1 is no longer v1's primary), then demotes it
    start_agent(procs, agent_groups, fleet.lab.url, fleet.lab.token_file, "s1", "a",
                tmp_path / "s1")  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert refused(write(old_endpoint)), "the old primary accepted a write"
        time.sleep(0.2)
    report = wait_for(
        lambda: (r := serving(fleet.client, "s1", "v1")) and r["role"] == "shadow" and r,
        30,
        "s1 a shadow of v1 again",
    )
    assert report["generation"] == 2
    assert refused(write(old_endpoint))
