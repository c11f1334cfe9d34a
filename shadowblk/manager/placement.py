"""Where a volume's shadows go, and why: pure functions over the store's model.

Each server is a candidate for each missing shadow. Hard rules reject it (with the reason);
the others get a score in [0, 1] from free capacity, I/O headroom and predicted risk, less
penalties for correlated risk. docs/placement.md explains the scoring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from shadowblk.manager.store.model import Server, ServerState, Volume


@dataclass(frozen=True)
class Policy:
    """The operator's knobs; the defaults suit a fleet with zones and racks."""

    weight_capacity: float = 0.4  # free space left after placing, share of the server
    weight_headroom: float = 0.3  # 1 - I/O load
    weight_risk: float = 0.3  # 1 - failure probability / the rejection threshold
    max_failure_probability: float = 0.5  # at or above: never a shadow
    max_io_load: float = 0.9  # at or above: no performance headroom
    same_model_penalty: float = 0.25  # shares a drive model with the primary
    forced_domain_penalty: float = 0.5  # in the primary's zone or rack, allowed by `force`
    force_same_domain: bool = False  # the operator allows the primary's zone/rack


@dataclass
class Candidate:
    """One server judged for one shadow of one volume."""

    server: str
    accepted: bool
    score: float = 0.0
    reasons: list[str] = field(default_factory=list)


@dataclass
class Decision:
    """The shadows chosen for a volume, every candidate's verdict, and what was forced."""

    volume: str
    chosen: list[str]
    wanted: int
    candidates: list[Candidate]
    warnings: list[str] = field(default_factory=list)

    @property
    def unfilled(self) -> bool:
        return len(self.chosen) < self.wanted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def explain(self) -> str:
        """Human-readable text for `placement explain`: chosen first, then by score."""
        lines = [f"volume {self.volume}: {len(self.chosen)} of {self.wanted} shadow(s) placed"]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        order = sorted(
            self.candidates, key=lambda c: (c.server not in self.chosen, not c.accepted, -c.score)
        )
        for c in order:
            verdict = "CHOSEN" if c.server in self.chosen else "ok" if c.accepted else "rejected"
            lines.append(
                f"  {c.server:<16} {verdict:<8} score {c.score:.3f}  {'; '.join(c.reasons)}"
            )
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def judge(
    volume: Volume, server: Server, servers: dict[str, Server], policy: Policy, free: int
) -> Candidate:
    """Judge SERVER (with FREE bytes still free) as a new shadow of VOLUME."""
    primary = servers.get(volume.primary)
    taken = {volume.primary, *volume.shadow_servers()}
    shadow_racks = {
        (servers[n].zone, servers[n].rack) for n in volume.shadow_servers() if n in servers
    }
    c = Candidate(server.name, accepted=True)

    def reject(reason: str) -> None:
        c.accepted = False
        c.reasons.append(reason)

    if server.name == volume.primary:
        reject("is the primary")
    elif server.name in taken:
        reject("holds a shadow of this volume already")
    if server.state is not ServerState.UP:
        reject(f"server is {server.state.value}")
    if free < volume.size_bytes:
        reject(f"not enough free space: needs {_gib(volume.size_bytes)}, has {_gib(free)}")
    if server.failure_probability >= policy.max_failure_probability:
        reject(
            f"predicted failure probability {server.failure_probability:.2f} "
            f"≥ {policy.max_failure_probability:.2f}"
        )
    if server.io_load >= policy.max_io_load:
        reject(f"no performance headroom: I/O load {server.io_load:.2f} ≥ {policy.max_io_load}")
    penalty = 0.0
    if primary is not None and server.name != primary.name:
        for domain in ("zone", "rack"):
            same = getattr(server, domain) == getattr(primary, domain)
            if domain == "rack":
                same = same and server.zone == primary.zone
            if not same:
                continue
            if policy.force_same_domain:
                penalty += policy.forced_domain_penalty
                c.reasons.append(
                    f"FORCED: same {domain} as the primary ({getattr(server, domain)})"
                )
            else:
                reject(f"same {domain} as the primary ({getattr(server, domain)})")
        shared = sorted(set(server.drive_models) & set(primary.drive_models))
        if shared:
            penalty += policy.same_model_penalty
            c.reasons.append(f"correlated risk: same drive model as the primary ({shared[0]})")
    if (server.zone, server.rack) in shadow_racks and server.name not in taken:
        reject(f"same rack as another shadow of this volume ({server.zone}/{server.rack})")
    if not c.accepted:
        return c
    capacity = max(0, free - volume.size_bytes) / server.capacity_bytes
    headroom = 1.0 - server.io_load
    risk = 1.0 - server.failure_probability / policy.max_failure_probability
    c.score = max(
        0.0,
        policy.weight_capacity * capacity
        + policy.weight_headroom * headroom
        + policy.weight_risk * risk
        - penalty,
    )
    c.reasons.insert(
        0,
        f"free after {_gib(max(0, free - volume.size_bytes))} ({capacity:.0%}), "
        f"I/O headroom {headroom:.0%}, failure probability {server.failure_probability:.2f}",
    )
    return c


def judge_all(
    volume: Volume, servers: list[Server], policy: Policy, free: dict[str, int] | None = None
) -> list[Candidate]:
    """Every server judged for VOLUME; FREE overrides the servers' own free bytes."""
    by_name = {s.name: s for s in servers}
    return [
        judge(volume, s, by_name, policy, s.free_bytes if free is None else free[s.name])
        for s in servers
    ]


def missing(volume: Volume) -> int:
    return max(0, volume.shadows_wanted - len(volume.shadows))


def pick(volume: Volume, candidates: list[Candidate], servers: list[Server]) -> list[str]:
    """The best-scoring accepted candidates, one per rack, as many as VOLUME misses."""
    where = {s.name: (s.zone, s.rack) for s in servers}
    chosen: list[str] = []
    for c in sorted(candidates, key=lambda c: (-c.score, c.server)):
        if len(chosen) == missing(volume):
            break
        if c.accepted and where[c.server] not in {where[n] for n in chosen}:
            chosen.append(c.server)
    return chosen


def decide(volume: Volume, candidates: list[Candidate], chosen: list[str]) -> Decision:
    """Bundle a decision with what the operator must be told."""
    warnings = [
        f"{c.server}: {r}"
        for c in candidates
        if c.server in chosen
        for r in c.reasons
        if r.startswith("FORCED")
    ]
    if len(chosen) < missing(volume):
        warnings.append(
            f"only {len(chosen)} of {missing(volume)} missing shadow(s) could be placed"
        )
    return Decision(volume.name, chosen, missing(volume), candidates, warnings)


def place(volume: Volume, servers: list[Server], policy: Policy | None = None) -> Decision:
    """Choose the missing shadows of one volume."""
    policy = policy or Policy()
    candidates = judge_all(volume, servers, policy)
    return decide(volume, candidates, pick(volume, candidates, servers))
