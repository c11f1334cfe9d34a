"""Switchovers, planned and emergency: the steps between the store, the agents and `attach`.

Planned (docs/switchover.md): the target shadow's agent starts a standby `serve` (imports
loaded, volume not opened) while I/O still flows; then every `attach` router of the volume
closes its gate and drains in-flight requests; the generation is raised by compare-and-swap;
the old primary is fenced (its `serve` refuses writes with ESHUTDOWN) and ships its last epoch;
the shadow is promoted (the standby opens the image at the new generation); the routers repoint
and open their gates. Only those last four steps are the VM's pause. Then the old primary is
demoted to a shadow (resynced from the bitmap) and every server gets the order of its new role.

Emergency: a primary's server stopped heartbeating. Its `serve` stops accepting writes when
its lease runs out (lease_s after the last heartbeat it sent), so the manager waits that long
(plus a margin) after the last heartbeat it received, raises the generation only if the server
stayed silent, promotes the shadow at the highest applied epoch, and repoints the routers
(which hold the VM's I/O meanwhile: their upstream is gone or answers ESHUTDOWN).

Steps run in the event loop; store calls on the store thread. One switchover per volume at a
time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from shadowblk.manager import dirty_compare, replenish
from shadowblk.manager.api_errors import ApiError
from shadowblk.manager.store import StoreError
from shadowblk.timings import Timings

log = logging.getLogger(__name__)

LEASE_MARGIN_S = 0.25  # beyond a lease: scheduling and clock-rate slack between two hosts
DRAIN_S = 30.0  # before the pause: the old primary ships what it has (writes go on)
FENCE_DRAIN_S = 10.0  # in the pause: the wait for the last epoch (below attach's hold time)
LOST_DRAIN_S = 1.0  # a primary whose device is gone: what is in flight ships now or never
AGENT_TIMEOUT_S = 60.0
ATTACH_TIMEOUT_S = 15.0
PAUSE_LIMIT_S = 10.0  # a router reopens its gate by itself if the switchover dies mid-way
HOLD_S = 120.0  # the longest the old primary's shadow server waits for the demotion
PRIME_WAIT_S = 5.0  # the target's checkpoint before the pause (at its next epoch boundary)


class StepFailed(Exception):
    """A switchover step that an agent or the network refused."""


class Switchovers:
    """The switchovers one (leading) manager runs."""

    def __init__(self, manager: Any, token: str) -> None:
        self.manager, self.token = manager, token
        self._locks: dict[str, asyncio.Lock] = {}
        self._emergencies: dict[str, asyncio.Task] = {}
        self._said: dict[str, str] = {}  # the last complaint per volume, said once
        self._session: aiohttp.ClientSession | None = None

    def _lock(self, volume: str) -> asyncio.Lock:
        return self._locks.setdefault(volume, asyncio.Lock())

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        for task in self._emergencies.values():
            task.cancel()
        if self._session is not None:
            await self._session.close()

    # --- the calls ---------------------------------------------------------------------------
    async def _agent(self, address: str, volume: str, call: str, body: dict) -> dict[str, Any]:
        url = f"http://{address}/v1/volumes/{volume}/{call}"
        headers = {"Authorization": f"Bearer {self.token}"}
        session = await self._http()
        timeout = aiohttp.ClientTimeout(total=AGENT_TIMEOUT_S)
        try:
            async with session.post(url, json=body, headers=headers, timeout=timeout) as reply:
                doc = await reply.json(content_type=None)
                if reply.status != 200:
                    raise StepFailed(f"{call} at {address}: {doc.get('error', reply.status)}")
                return doc
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise StepFailed(f"{call} at {address}: {type(err).__name__}: {err}") from None

    async def _attach(self, url: str, call: str, body: dict) -> dict[str, Any]:
        session = await self._http()
        timeout = aiohttp.ClientTimeout(total=ATTACH_TIMEOUT_S)
        async with session.post(f"{url}/{call}", json=body, timeout=timeout) as reply:
            doc = await reply.json(content_type=None)
            if reply.status != 200:
                raise StepFailed(f"{call} at {url}: {doc.get('error', reply.status)}")
            return doc

    async def _each_attach(self, volume: str, urls: list[str], call: str, body: dict) -> dict:
        """CALL on every router; those that do not answer are forgotten (they follow by poll
        when they come back and register again)."""
        results = await asyncio.gather(
            *(self._attach(u, call, body) for u in urls), return_exceptions=True
        )
        answers = {}
        for url, result in zip(urls, results, strict=True):
            if isinstance(result, aiohttp.ClientConnectorError):  # refused: nobody listens
                log.warning("attach %s of %s is gone: forgotten", url, volume)
                try:  # never fatal here: the gate step runs beside the CAS (planned)
                    await self.manager.run(self.manager.fleet.detach, volume, url)
                except Exception as err:
                    log.warning("attach %s of %s not forgotten: %s", url, volume, err)
            elif isinstance(result, BaseException):
                log.warning("attach %s of %s: %s %s", url, volume, call, result)
            else:
                answers[url] = result
        return answers

    # --- planned -----------------------------------------------------------------------------
    async def planned(
        self, name: str, to: str | None, reason: str, fence: int, planned: bool = True
    ) -> dict[str, Any]:
        """Hand VOLUME over to TO (or the best shadow); the record of how it went."""
        fleet = self.manager.fleet
        async with self._lock(name):
            plan = await self.manager.run(fleet.plan_switchover, name, to)
            volume, after = plan["volume"], plan["after"]
            t = Timings()
            record: dict[str, Any] = {
                "volume": name, "from": plan["from"], "to": plan["to"], "reason": reason,
                "planned": planned, "generation": after["generation"],
            }  # fmt: skip
            try:
                await self._agent(plan["to_control"], name, "prepare", {"volume": after})
            except StepFailed as err:  # nothing changed yet
                raise ApiError(502, f"switchover of {name} not started: {err}") from None
            drained = await self._drain(plan, name)
            t.mark("prepare_ms")
            # the bulk of the checksum compare, while writes flow: the pause compares the rest
            early = await dirty_compare.before_pause(self._agent, plan, name, volume["generation"])
            try:  # the old primary's shadow server waits for the demoted copy (not in the pause;
                # after the compare, which may be long, so that the hold outlasts the switchover)
                await self._agent(plan["from_control"], name, "hold", {"seconds": HOLD_S})
            except StepFailed as err:
                log.warning("%s: %s: the old primary may need a full sync", name, err)
            t.mark("precompare_ms")
            # the target's shadow server checkpoints now, writes still flowing, so that its
            # hand-over in the pause syncs only the last moments (RoleChanges.prime); then what
            # was written meanwhile ships before the pause too
            await self._prime(plan["to_control"], name)
            drained = await self._drain(plan, name)
            t.mark("prime_ms")
            urls = volume.get("attachments", [])
            # the CAS runs while the routers close their gates (one round trip less in the
            # pause): it changes only the store, and nothing acts on it before the fence below,
            # which waits for both: the old primary takes writes until then (shipped in its
            # last epoch, I2), the target none until its promotion (I3); a follower repoints
            # only to a primary whose agent reports it running, i.e. after the promotion
            cas = asyncio.ensure_future(
                self.manager.run(fleet.raise_generation, name, plan["to"], volume["generation"])
            )
            try:
                paused = await self._each_attach(name, urls, "pause", {"limit_s": PAUSE_LIMIT_S})
            except BaseException:
                await asyncio.gather(cas, return_exceptions=True)
                raise
            t.mark("gate_ms")  # cas_ms below: what the CAS took beyond the gate
            repointed: dict[str, dict] = {}
            handover: asyncio.Future | None = None
            try:
                try:
                    after = await cas
                except ApiError:  # another change won: nothing moved, the old server's
                    await self._release(plan["from_control"], name)  # shadow server restarts
                    raise
                t.mark("cas_ms")
                # the fence's answer brings the compare's first call in the pause (the old
                # primary's blocks changed since the compare before it)
                dirty = volume["generation"] if early.compared else None
                fenced = await self._fence(plan["from_control"], name, dirty=dirty)
                t.mark("fence_ms")
                if fenced.get("drained"):  # else the shadow lacks writes: the routers replay
                    # the target's shadow server lets go of the volume (its checkpoint) while
                    # the compare reads the files: the old primary is fenced and its last epoch
                    # applied, so nothing more reaches the shadow (RoleChanges.handover)
                    handover = asyncio.ensure_future(self._handover(plan["to_control"], name))
                    record["checksums"] = await dirty_compare.in_pause(
                        self._agent, plan, name, volume["generation"], after["generation"],
                        early, fenced.get("dirty"), handover,
                    )  # fmt: skip
                    t.mark("compare_ms")
                    await handover
                    t.mark("handover_ms")  # what the hand-over took beyond the compare
                promoted = await self._agent(plan["to_control"], name, "promote", {"volume": after})
                t.mark("promote_ms")
                body = {"uri": promoted["endpoint"], "generation": after["generation"]}
                if not fenced.get("drained"):  # the shadow may lack acknowledged writes
                    log.error("%s: the old primary's last epoch was not applied by %s: the "
                              "routers replay what was written since the last FLUSH", name,
                              plan["to"])  # fmt: skip
                    body["replay"] = True
                repointed = await self._each_attach(name, list(paused), "repoint", body)
                t.mark("repoint_ms")
            except StepFailed as err:
                record.update(outcome="failed", error=str(err), timings_ms=t.ms)
                await self._record(record, fence)
                raise ApiError(502, f"switchover of {name} failed: {err}", record) from None
            except dirty_compare.Mismatch as err:  # no copy to trust: not promoted, not ordered
                log.error("%s", err)
                if handover is not None:  # the target's shadow server takes the volume back
                    await handover
                    await self._handover(plan["to_control"], name, 0.0)
                record.update(outcome="aborted", error=str(err), checksums=err.checks,
                              timings_ms=t.ms)  # fmt: skip
                await self._record(record, fence)
                raise ApiError(502, f"switchover of {name} aborted: {err}", record) from None
            finally:
                await self._each_attach(name, [u for u in paused if u not in repointed],
                                        "resume", {})  # fmt: skip
            steps = ("gate_ms", "cas_ms", "fence_ms", "compare_ms", "handover_ms", "promote_ms",
                     "repoint_ms")  # fmt: skip
            pause_ms = sum(t.ms.get(step, 0.0) for step in steps)
            await dirty_compare.log_found(self._agent, plan, name, record.get("checksums", {}))
            try:
                demoted = await self._agent(plan["from_control"], name, "demote", {"volume": after})
                record["old_primary"] = demoted["resync"]
            except StepFailed as err:  # its next heartbeat's order demotes it
                record["old_primary"] = f"not demoted yet: {err}"
            await self._release(plan["to_control"], name)  # its shadow server starts again
            t.mark("demote_ms")
            record.update(
                outcome="succeeded",
                endpoint=promoted["endpoint"],
                epoch=promoted["epoch"],
                drained=bool(fenced.get("drained")),
                delta_bytes=int(fenced.get("delta_bytes", 0)),
                pause_seconds=round(pause_ms / 1000, 6),
                router_pause_ms=max((r.get("pause_ms", 0.0) for r in repointed.values()),
                                    default=None),
                attachments=len(repointed),
                timings_ms={**t.ms, "total_ms": t.total()},
                steps_ms={**_inner_steps(fenced, promoted),
                          "drain_rounds_ms": drained.get("rounds_ms")},
            )  # fmt: skip
            await self._record(record, fence)
            log.info("switchover of %s to %s: %s", name, plan["to"], record["timings_ms"])
            return record

    async def _drain(self, plan: dict[str, Any], name: str) -> dict[str, Any]:
        """What is written so far is shipped before the pause (the fence ships the rest); 409
        (nothing changed, the VM never paused) if the shadows cannot catch up now."""
        try:
            drained = await self._agent(plan["from_control"], name, "drain", {"timeout": DRAIN_S})
        except StepFailed as err:
            drained = {"drained": False, "error": str(err)}
        if not drained.get("drained"):  # the pause would be as long as the lag: not now
            await self._release(plan["from_control"], name)
            raise ApiError(
                409,
                f"{name}: its shadows did not catch up with the primary within {DRAIN_S:.0f} "
                "s: not switching over now (nothing changed; try again later)",
                drained,
            )
        return drained

    async def _release(self, address: str, name: str) -> None:
        """Start the shadow server of ADDRESS's agent again (held during a role change)."""
        try:
            await self._agent(address, name, "hold", {"seconds": 0})
        except StepFailed as err:
            log.warning("%s: a shadow server stays held (for 2 min at most): %s", name, err)

    async def _fence(
        self,
        address: str,
        name: str,
        drain_s: float = FENCE_DRAIN_S,
        cas_at: float | None = None,
        dirty: int | None = None,
    ) -> dict[str, Any]:
        """Fence the old primary; if its agent does not answer, its lease fences it: wait. The
        lease runs out lease_s after the last renewal, and renewals stop at the CAS (CAS_AT,
        monotonic; None: count from now). DIRTY: the compare's generation (the answer brings
        the blocks changed since the compare before the pause)."""
        body: dict[str, Any] = {"drain": drain_s}
        if dirty is not None:
            body["dirty"] = dirty
        try:
            return await self._agent(address, name, "fence", body)
        except StepFailed as err:
            since = time.monotonic() if cas_at is None else cas_at
            wait = since + self.manager.fleet.lease_s + LEASE_MARGIN_S - time.monotonic()
            log.warning("%s: fence failed (%s): waiting %.1f s for its lease to run out",
                        name, err, max(wait, 0.0))  # fmt: skip
            if wait > 0:
                await asyncio.sleep(wait)
            return {"drained": False, "fence": f"lease ran out ({err})"}

    async def _handover(self, address: str, name: str, seconds: float = HOLD_S) -> None:
        """The target's shadow server lets go of NAME before `promote` (SECONDS 0: takes it
        back); if it does not, `promote` hands it over itself (in the pause, as before)."""
        try:
            await self._agent(address, name, "handover", {"seconds": seconds})
        except StepFailed as err:
            log.warning("%s: handover (%.0f s): %s", name, seconds, err)

    async def _prime(self, address: str, name: str) -> None:
        """The target's shadow server checkpoints NAME (at most PRIME_WAIT_S); if it does not,
        the hand-over in the pause syncs more, nothing else changes."""
        try:
            primed = await self._agent(address, name, "prime", {"wait": PRIME_WAIT_S})
        except StepFailed as err:
            log.warning("%s: the target was not checkpointed before the pause: %s", name, err)
            return
        if not primed.get("checkpointed"):
            log.info("%s: the target's checkpoint took over %.0f s", name, PRIME_WAIT_S)

    async def _prepare(self, address: str, name: str, after: dict[str, Any]) -> None:
        """A standby `serve` on the target, so that the promotion only opens the volume; if it
        fails, the promotion starts one itself."""
        try:
            await self._agent(address, name, "prepare", {"volume": after})
        except StepFailed as err:
            log.warning("%s: no standby on the target (%s): the promotion starts one", name, err)

    async def _record(self, record: dict[str, Any], fence: int) -> None:
        await self.manager.run(self.manager.fleet.finish_switchover, record, fence)

    # --- emergency ---------------------------------------------------------------------------
    async def watch(self, fence: int) -> None:
        """Start an emergency switchover for every volume whose primary's server is down."""
        for name in await self.manager.run(self.manager.fleet.orphaned):
            running = self._emergencies.get(name)
            if running is None or running.done():
                self._emergencies[name] = asyncio.create_task(self.emergency(name, fence))
        await self._replenish(fence)

    async def _replenish(self, fence: int) -> None:
        """New shadows for the volumes short of them (manager/replenish.py)."""
        fleet, silent_s = self.manager.fleet, self.manager.heartbeat_timeout_s
        for name in await self.manager.run(replenish.short, fleet, silent_s, time.time()):
            if self._lock(name).locked():
                continue  # a switchover of it runs: the next round looks again
            async with self._lock(name):
                await self.manager.run(
                    replenish.replace_lost, fleet, name, silent_s, time.time(), fence
                )

    async def emergency(self, name: str, fence: int) -> dict[str, Any] | None:
        """Promote the best shadow of NAME, whose primary's server is down."""
        fleet = self.manager.fleet
        async with self._lock(name):
            try:
                plan = await self.manager.run(fleet.plan_emergency, name)
            except (ApiError, StoreError) as err:
                if self._said.get(name) != str(err):
                    log.error("%s: its primary is down and no shadow can take over: %s", name, err)
                    self._said[name] = str(err)
                return None
            if plan is None:
                return None
            t = Timings()
            # the target's `serve` starts (standby: it serves nothing) during the lease wait
            prepared = asyncio.ensure_future(self._prepare(plan["to_control"], name, plan["after"]))
            wait = plan["silent_since"] + fleet.lease_s + LEASE_MARGIN_S - time.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the old primary's lease runs out first (I3)
            t.mark("lease_wait_ms")
            volume = plan["volume"]
            record: dict[str, Any] = {
                "volume": name, "from": plan["from"], "to": plan["to"], "planned": False,
                "reason": f"{plan['from']} stopped heartbeating",
            }  # fmt: skip
            try:
                after = await self.manager.run(
                    fleet.take_over, name, plan["to"], volume["generation"], plan["silent_since"]
                )
                await prepared  # after the CAS: its time is cas_ms
                t.mark("cas_ms")
                await self._promote(name, plan, after, record, t)
            except (StepFailed, ApiError, StoreError) as err:
                prepared.cancel()
                log.error("emergency switchover of %s failed: %s", name, err)
                record.update(outcome="failed", error=str(err), timings_ms=t.ms)
                await self._record(record, fence)
                return record
            record["pause_seconds"] = round(time.time() - plan["silent_since"], 6)  # the outage
            await self._record(record, fence)
            log.warning("emergency switchover of %s to %s: %s", name, plan["to"], record)
            return record

    async def _promote(
        self, name: str, plan: dict[str, Any], after: dict[str, Any], record: dict, t: Timings
    ) -> None:
        """The end of an emergency, the generation raised: promote, repoint, release; into
        RECORD."""
        record["generation"] = after["generation"]
        promoted = await self._agent(plan["to_control"], name, "promote", {"volume": after})
        t.mark("promote_ms")
        # replay: the old primary may have vanished without closing its connections (power
        # loss, partition), so a router need not have seen the loss; the writes it answered
        # since the last FLUSH may be missing on the promoted shadow
        body = {"uri": promoted["endpoint"], "generation": after["generation"], "replay": True}
        repointed = await self._each_attach(name, plan["volume"]["attachments"], "repoint", body)
        t.mark("repoint_ms")
        await self._release(plan["to_control"], name)
        record.update(
            outcome="succeeded",
            endpoint=promoted["endpoint"],
            epoch=promoted["epoch"],
            attachments=len(repointed),
            timings_ms={**t.ms, "total_ms": t.total()},
            steps_ms=_inner_steps({}, promoted),
        )

    async def lost(self, name: str, server: str, reason: str, fence: int) -> dict[str, Any]:
        """Promote the best shadow of NAME now: its primary's agent (SERVER) reports the
        volume's device gone (udev), so no heartbeat timeout is waited for. As in a planned
        switchover, the generation is raised first: the store no longer names SERVER the
        primary, so its heartbeats stop renewing its lease. Then it is fenced through its
        agent, with a short drain (its device can give nothing more); if the agent does not
        answer, its lease fences it: the promotion waits until it ran out, counted from the
        CAS (I3). Its copy is gone with the device: it is no shadow any more (replenish places
        a new one)."""
        fleet = self.manager.fleet
        async with self._lock(name):
            plan = await self.manager.run(fleet.plan_lost, name, server)
            t = Timings()
            record: dict[str, Any] = {
                "volume": name, "from": plan["from"], "to": plan["to"], "planned": False,
                "reason": reason,
            }  # fmt: skip
            try:
                after = await self.manager.run(
                    fleet.raise_generation, name, plan["to"], plan["volume"]["generation"]
                )
                cas_at = time.monotonic()
                t.mark("cas_ms")
                await self.manager.run(fleet.drop_lost_copy, name, plan["from"])
                fenced = await self._fence(plan["from_control"], name, LOST_DRAIN_S, cas_at)
                record["drained"] = bool(fenced.get("drained"))
                record["fence"] = fenced.get("fence", "fenced by its agent")
                t.mark("fence_ms")
                await self._promote(name, plan, after, record, t)
            except (StepFailed, ApiError, StoreError) as err:
                log.error("emergency switchover of %s (device lost) failed: %s", name, err)
                record.update(outcome="failed", error=str(err), timings_ms=t.ms)
                await self._record(record, fence)
                return record
            record["pause_seconds"] = round(t.total() / 1000, 6)
            await self._record(record, fence)
            log.warning("emergency switchover of %s to %s (%s): %s", name, plan["to"], reason,
                        record)  # fmt: skip
            return record

    # --- drain -------------------------------------------------------------------------------
    async def drain(self, server: str, reason: str, fence: int) -> list[dict[str, Any]]:
        """Mark SERVER draining and hand every primary on it over to a shadow, one by one."""
        fleet = self.manager.fleet
        names = await self.manager.run(fleet.primaries_on, server)
        await self.manager.run(fleet.set_draining, server)
        records = []
        for name in names:
            try:
                records.append(await self.planned(name, None, reason, fence))
            except ApiError as err:
                records.append({"volume": name, "from": server, "outcome": "failed",
                                "error": err.error, "reason": reason})  # fmt: skip
        return records


def _inner_steps(fenced: dict[str, Any], promoted: dict[str, Any]) -> dict[str, Any]:
    """What the agents measured inside the fence and the promotion (milliseconds)."""
    return {"fence_serve_ms": fenced.get("fence_ms"), "promote": promoted.get("steps_ms", {})}
