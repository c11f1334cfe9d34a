"""Placing the shadows of many volumes at once: a MILP with capacity constraints, and the greedy
baseline it is measured against.

Greedy (volume by volume, largest first, each taking its best-scoring servers) can fill a
server that a later volume had no alternative to; the MILP sees every volume at once. Both
are judged with the same scores (placement.judge against the fleet as it is now), so their
totals compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from shadowblk.manager.placement import (
    Candidate,
    Decision,
    Policy,
    decide,
    judge_all,
    missing,
    pick,
)
from shadowblk.manager.store.model import Server, Volume


class PlacementError(Exception):
    """The solver failed (not: some shadows could not be placed, which a plan reports)."""


@dataclass
class Plan:
    """A decision per volume, and how good the whole is under the shared static scores."""

    method: str
    decisions: dict[str, Decision]
    total_score: float

    @property
    def placed(self) -> int:
        return sum(len(d.chosen) for d in self.decisions.values())

    @property
    def unplaced(self) -> dict[str, int]:
        return {n: d.wanted - len(d.chosen) for n, d in self.decisions.items() if d.unfilled}


def _scores(judged: dict[str, list[Candidate]]) -> dict[tuple[str, str], float]:
    return {(v, c.server): c.score for v, cs in judged.items() for c in cs if c.accepted}


def _plan(
    method: str,
    volumes: list[Volume],
    judged: dict[str, list[Candidate]],
    chosen: dict[str, list[str]],
    scores: dict[tuple[str, str], float],
) -> Plan:
    decisions = {v.name: decide(v, judged[v.name], chosen[v.name]) for v in volumes}
    total = sum(scores[(v, s)] for v, d in decisions.items() for s in d.chosen)
    return Plan(method, decisions, total)


def greedy(volumes: list[Volume], servers: list[Server], policy: Policy | None = None) -> Plan:
    """Volume by volume, largest first; each takes its best-scoring servers that still fit."""
    policy = policy or Policy()
    free = {s.name: s.free_bytes for s in servers}
    judged: dict[str, list[Candidate]] = {}
    chosen: dict[str, list[str]] = {}
    for v in sorted(volumes, key=lambda v: (-v.size_bytes, v.name)):
        judged[v.name] = judge_all(v, servers, policy, free)
        chosen[v.name] = pick(v, judged[v.name], servers)
        for name in chosen[v.name]:
            free[name] -= v.size_bytes
    static = _scores({v.name: judge_all(v, servers, policy) for v in volumes})
    return _plan("greedy", volumes, judged, chosen, static)


def optimise(
    volumes: list[Volume],
    servers: list[Server],
    policy: Policy | None = None,
    gap: float = 0.01,
    time_limit_s: float = 30.0,
) -> Plan:
    """The placement that places the most missing shadows and, among those, scores best
    (within GAP of the best total score: proving the last fraction of a percent costs minutes).

    x[v, s] = 1 puts a shadow of v on s, for the (v, s) pairs placement.judge accepts, with
      Σ_s x[v, s] = missing(v)                 (every missing shadow; ≤ in the second pass)
      Σ_v size(v)·x[v, s] ≤ free(s)            (capacity)
      Σ_{s in rack r} x[v, s] ≤ 1              (one copy of a volume per rack)
    First pass: place everything, maximise Σ score·x. If that is infeasible, second pass:
    maximise Σ (1 + ε·score)·x, where ε·(any total score) < 1 keeps the count first.
    """
    policy = policy or Policy()
    judged = {v.name: judge_all(v, servers, policy) for v in volumes}
    pairs = [
        (vi, s.name, c.score)
        for vi, v in enumerate(volumes)
        if missing(v)
        for s, c in zip(servers, judged[v.name], strict=True)
        if c.accepted
    ]
    chosen: dict[str, list[str]] = {v.name: [] for v in volumes}
    if not pairs:
        return _plan("milp", volumes, judged, chosen, {})

    rows, cols, vals, upper = [], [], [], []

    def constraint(members: list[int], weights: list[float], limit: float) -> None:
        row = len(upper)
        rows.extend([row] * len(members))
        cols.extend(members)
        vals.extend(weights)
        upper.append(limit)

    by_volume: dict[int, list[int]] = {}
    by_server: dict[str, list[int]] = {}
    by_rack: dict[tuple[int, tuple[str, str]], list[int]] = {}
    where = {s.name: (s.zone, s.rack) for s in servers}
    for k, (vi, name, _) in enumerate(pairs):
        by_volume.setdefault(vi, []).append(k)
        by_server.setdefault(name, []).append(k)
        by_rack.setdefault((vi, where[name]), []).append(k)
    for vi, members in by_volume.items():  # these rows come first: the first pass pins them
        constraint(members, [1.0] * len(members), missing(volumes[vi]))
    for s in servers:
        members = by_server.get(s.name, [])
        sizes = [float(volumes[pairs[k][0]].size_bytes) for k in members]
        if sum(sizes) > s.free_bytes:  # a server that fits them all needs no constraint
            constraint(members, sizes, float(s.free_bytes))
    for members in by_rack.values():
        if len(members) > 1:
            constraint(members, [1.0] * len(members), 1.0)

    a = coo_array((vals, (rows, cols)), shape=(len(upper), len(pairs))).tocsr()
    scores = np.array([score for _, _, score in pairs])
    lower = np.full(len(upper), -np.inf)
    lower[: len(by_volume)] = upper[: len(by_volume)]
    x = _solve(-scores, LinearConstraint(a, lower, upper), gap, time_limit_s)
    if x is None:
        wanted = sum(missing(v) for v in volumes)
        epsilon = 1.0 / (1.0 + wanted)
        tight = min(gap, 0.5 / (1.0 + wanted))  # the count must come out exact
        x = _solve(-(1.0 + epsilon * scores), LinearConstraint(a, -np.inf, upper), tight,
                   time_limit_s)  # fmt: skip
        if x is None:
            raise PlacementError("the solver found no placement at all")
    for k, (vi, name, _) in enumerate(pairs):
        if x[k] > 0.5:
            chosen[volumes[vi].name].append(name)
    return _plan("milp", volumes, judged, chosen, _scores(judged))


def _solve(
    cost: np.ndarray, constraints: LinearConstraint, gap: float, time_limit_s: float
) -> np.ndarray | None:
    """Binary x minimising cost·x; None if infeasible. A solution found before the time limit
    is used; no solution at all within it is an error."""
    result = milp(
        cost,
        constraints=constraints,
        integrality=np.ones(len(cost)),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit_s, "mip_rel_gap": gap},
    )
    if result.status == 2:
        return None
    if result.x is None:
        raise PlacementError(f"the solver found no placement: {result.message}")
    return result.x
