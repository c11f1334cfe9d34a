"""The agent's shadow server listens for verify on a free port the first time, and the agent
keeps the port it bound (read from the `verify` line before `ready`) so a restart registers the
same `verify_address` (the fleet scrub: docs/integrity.md, "Scrub a fleet")."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from shadowblk.agent.children import ReadyLine
from shadowblk.agent.hosting import Endpoint, Hosting, Replication
from tests.unit.test_agent_hosting import option


def hosting(tmp_path: Path) -> Hosting:
    never = Replication(True, tmp_path / "hmac.key", lambda server: "")
    return Hosting(tmp_path, Endpoint.parse("127.0.0.1:0"), Endpoint.parse("127.0.0.1:0"), never)


def test_the_verify_port_bound_is_kept(tmp_path: Path) -> None:
    h = hosting(tmp_path)
    assert option(h.shadow_child.argv(), "--verify-listen") == ["127.0.0.1:0"]
    said = "echo verify verify://127.0.0.1:4242; echo ready shadow://127.0.0.1:4241"
    proc = subprocess.Popen(["sh", "-c", said], stdout=subprocess.PIPE)  # the shadow's lines
    try:
        ready, deadline = ReadyLine(proc), time.monotonic() + 10
        while ready.poll() is None:
            assert time.monotonic() < deadline, "no ready line"
            time.sleep(0.01)
        assert ready.line("verify ") == "verify://127.0.0.1:4242" and ready.line("nope") is None
        h.shadow_child.proc, h.shadow_child.ready, h.shadow_child.url = proc, ready, ready.url
        h.note_shadow_ports()
    finally:
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert (h.shadow_port, h.verify_port) == (4241, 4242)
    again = hosting(tmp_path)  # a restarted agent, from agent.json
    argv = again.shadow_child.argv()
    assert option(argv, "--verify-listen") == ["127.0.0.1:4242"]
    assert option(argv, "--listen") == ["127.0.0.1:4241"]
