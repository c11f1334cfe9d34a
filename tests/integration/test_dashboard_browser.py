"""The dashboard in Debian's headless Chromium, driven over the DevTools protocol: a lab fleet's
volume lag changes and a switchover appears on the open page without a reload; a screenshot
is kept under test-artifacts/."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from shadowblk.agent.metrics import AgentMetrics
from tests.manager_lab import BEAT_ON_DEMAND, GiB, Lab, register_servers, start_manager
from tests.procs import Processes, free_port

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


class Page:
    """One browser tab over the DevTools protocol (commands only; events are ignored)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.ids = ws, itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        mid = next(self.ids)
        await self.ws.send_json({"id": mid, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=20)
            if msg.get("id") == mid:
                assert "error" not in msg, msg
                return msg["result"]

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10) -> Any:
        """The value of EXPRESSION once it is truthy; the last value in the failure message."""
        deadline, value = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"{expression} still {value!r} after {timeout} s")


def start_chromium(procs: Processes, tmp: Path) -> str:
    """Headless Chromium with a fresh profile; the DevTools HTTP endpoint's URL."""
    port = free_port()
    procs.start(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp / 'profile'}", "--window-size=1400,1100",
         f"--remote-debugging-port={port}", "about:blank"],
        name="chromium",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/json/version", timeout=2):
                return url
        except OSError:
            time.sleep(0.1)
    raise AssertionError("chromium's DevTools endpoint did not come up")


def beat(lab: Lab, shadow: str, lag_s: float, failure: float = 0.2) -> None:
    """Heartbeats of the fleet as its agents would send them, with v1's shadow at LAG_S and
    s1's failure probability at FAILURE."""
    agent = AgentMetrics()
    agent.record_write("v1", 10 * 4096)
    agent.set_volume("v1", dirty_bytes=8192, epoch=12)
    agent.set_shadow("v1", shadow, "in_sync", lag_s, int(lag_s * 1e6))
    agent.observe_io("write", 0.002 + lag_s / 1000)
    agent.set_failure(failure, ["SMART 5 reallocated sectors: 3"])
    client = lab.client()
    client.heartbeat("s1", used_bytes=0, **agent.health())
    for name in ("s2", "s3"):
        client.heartbeat(name, used_bytes=0)


async def drive(lab: Lab, devtools: str, shadow: str) -> bytes:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{devtools}/json/new?about:blank") as reply:
            target = await reply.json()
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.send("Page.enable")
            await page.send("Page.navigate", url=f"{lab.url}/dashboard/")
            lag = f"document.querySelector('[data-lag=\"v1/{shadow}\"]')?.textContent"
            assert await page.wait_for(f"{lag} === '1.5 s' && {lag}")
            await page.js("window.notReloaded = true")
            assert await page.js("document.getElementById('conn').textContent") == "live"
            assert await page.js("document.querySelector('[data-fp=\"s1\"]').textContent") == (
                "0.20"
            )

            await asyncio.to_thread(beat, lab, shadow, 7.5)
            assert await page.wait_for(f"{lag} === '7.5 s' && {lag}")

            result = {"from": "s1", "to": shadow, "generation": 2, "outcome": "succeeded",
                      "pause_seconds": 0.0042, "planned": True}  # fmt: skip
            await asyncio.to_thread(
                lab.client().call, "POST", "/v1/volumes/v1/switchover-results", result
            )
            item = "document.querySelector('#timeline li[data-kind=\"switchover-result\"]')"
            text = await page.wait_for(f"{item}?.textContent")
            assert f"v1: switchover s1 → {shadow} succeeded, I/O paused 4.2 ms" in text
            assert await page.js("window.notReloaded") is True

            await asyncio.to_thread(beat, lab, shadow, 7.5, 0.85)
            alert = "document.querySelector('#alerts li[data-alert=\"FailureProbabilityHigh\"]')"
            text = await page.wait_for(f"{alert}?.textContent")
            assert "server s1 may fail soon: probability 0.85" in text
            assert "SMART 5 reallocated sectors: 3" in text
            assert await page.js("document.getElementById('alert-count').textContent") == "1"
            assert await page.js("window.notReloaded") is True

            points = await page.js(
                "document.querySelector('#plot-lag polyline').getAttribute('points')"
            )
            assert len(points.split()) >= 2, points  # the lag is plotted over time
            await act(page, lab)
            shot = await page.send("Page.captureScreenshot", format="png")
            return base64.b64decode(shot["data"])


async def act(page: Page, lab: Lab) -> None:
    """The switchover and drain buttons ask for a confirmation and the token, then call the
    manager and show its answer: refused without the right token, the manager's own verdict
    with it (this fleet has no agents behind its servers, so a drain of s3, which holds no
    primary, is the action that can succeed here)."""
    paths = await page.js("[...document.querySelectorAll('button[data-action]')]"
                          ".map(b => b.dataset.action)")  # fmt: skip
    assert "/v1/volumes/v1/switchover" in paths and "/v1/servers/s3/drain" in paths
    result = "document.getElementById('confirm-result')"
    await page.js("document.querySelector('[data-action=\"/v1/volumes/v1/switchover\"]').click()")
    assert await page.js("document.getElementById('confirm').hidden") is False
    assert "switch volume v1 over from s1" in await page.js(
        "document.getElementById('confirm-what').textContent"
    )
    await page.js("document.getElementById('confirm-token').value = 'wrong'")
    await page.js("document.getElementById('confirm-go').click()")
    assert await page.wait_for(f"{result}.dataset.status") == "401"
    assert "refused (401)" in await page.js(f"{result}.textContent")

    await page.js("document.querySelector('[data-action=\"/v1/servers/s3/drain\"]').click()")
    await page.js(f"document.getElementById('confirm-token').value = {json.dumps(lab.token)}")
    await page.js("document.getElementById('confirm-reason').value = 'from the test'")
    await page.js("document.getElementById('confirm-go').click()")
    assert await page.wait_for(f"{result}.dataset.status") == "200"
    assert await page.js(f"{result}.textContent") == "nothing to move"
    server = await asyncio.to_thread(lab.client().server, "s3")
    assert server["state"] == "draining"


def test_dashboard_updates_live(procs: Processes, tmp_path: Path) -> None:
    lab = start_manager(procs, f"sqlite:{tmp_path / 'meta.db'}", tmp_path, *BEAT_ON_DEMAND)
    register_servers(lab)
    created = lab.client().create_volume(name="v1", size_bytes=GiB, primary="s1", shadows=1)
    shadow = created["volume"]["shadows"][0]["server"]
    beat(lab, shadow, 1.5)
    devtools = start_chromium(procs, tmp_path)
    png = asyncio.run(drive(lab, devtools, shadow))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dashboard.png").write_bytes(png)


def test_dashboard_stream_is_server_sent_events(procs: Processes, tmp_path: Path) -> None:
    """The stream answers text/event-stream with the fleet's state about once a second."""
    lab = start_manager(procs, f"sqlite:{tmp_path / 'meta.db'}", tmp_path, *BEAT_ON_DEMAND)
    register_servers(lab)
    with urllib.request.urlopen(f"{lab.url}/dashboard/stream", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        stamps = []
        while len(stamps) < 4:
            line = reply.readline().decode()
            if line.startswith("data: "):
                stamps.append(json.loads(line[6:])["state"]["at"])
    assert 0 < (stamps[3] - stamps[0]) / 3 <= 2.0  # the page is at most 2 s behind
