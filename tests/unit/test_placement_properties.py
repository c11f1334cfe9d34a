"""Property tests: on any fleet, no placement breaks capacity or failure-domain rules, and the
MILP never places fewer shadows than greedy nor scores worse (beyond its stated gap)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowblk.manager.placement import Decision, Policy, place
from shadowblk.manager.placement_batch import greedy, optimise
from shadowblk.manager.store.model import Server, ServerState, Shadow, Volume

GIB = 2**30


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[Server], list[Volume], Policy]:
    servers = []
    for i in range(draw(st.integers(2, 9))):
        capacity = draw(st.integers(1, 12)) * GIB
        servers.append(
            Server(
                f"s{i}",
                zone=draw(st.sampled_from("abc")),
                rack=draw(st.sampled_from("12")),
                capacity_bytes=capacity,
                used_bytes=draw(st.integers(0, capacity // GIB)) * GIB,
                drive_models=draw(st.lists(st.sampled_from(["M1", "M2", "M3"]), max_size=2)),
                failure_probability=draw(st.floats(0, 1)),
                io_load=draw(st.floats(0, 1)),
                state=draw(st.sampled_from(list(ServerState))),
            )
        )
    names = [s.name for s in servers]
    volumes = []
    for i in range(draw(st.integers(1, 7))):
        primary = draw(st.sampled_from(names))
        others = [n for n in names if n != primary]
        shadows = draw(st.lists(st.sampled_from(others), max_size=1)) if others else []
        volumes.append(
            Volume(
                f"v{i}",
                size_bytes=draw(st.integers(1, 6)) * GIB,
                primary=primary,
                shadows_wanted=draw(st.integers(1, 3)),
                shadows=[Shadow(n) for n in shadows],
            )
        )
    return servers, volumes, Policy(force_same_domain=draw(st.booleans()))


def check_rules(
    decisions: dict[str, Decision], servers: list[Server], volumes: list[Volume], policy: Policy
) -> None:
    """Every chosen server obeys the hard rules; together they fit the servers' free space."""
    by_name = {s.name: s for s in servers}
    used = dict.fromkeys(by_name, 0)
    for v in volumes:
        chosen = decisions[v.name].chosen
        wanted = max(0, v.shadows_wanted - len(v.shadows))
        assert len(chosen) <= wanted
        assert decisions[v.name].unfilled == (len(chosen) < wanted)
        primary = by_name[v.primary]
        shadows = [by_name[s.server] for s in v.shadows]
        for name in chosen:
            s = by_name[name]
            used[name] += v.size_bytes
            assert name != primary.name and name not in (c.name for c in shadows)
            assert s.state is ServerState.UP
            assert s.failure_probability < policy.max_failure_probability
            assert s.io_load < policy.max_io_load
            assert (s.zone, s.rack) not in {(c.zone, c.rack) for c in shadows}
            said = [w for w in decisions[v.name].warnings if w.startswith(f"{name}: FORCED")]
            assert bool(said) == (s.zone == primary.zone)
            if not policy.force_same_domain:
                assert s.zone != primary.zone
            shadows.append(s)
    for name, total in used.items():
        assert total <= by_name[name].free_bytes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_single_volume_placement_obeys_the_rules(case) -> None:
    servers, volumes, policy = case
    for v in volumes:
        check_rules({v.name: place(v, servers, policy)}, servers, [v], policy)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_batch_placements_obey_the_rules_and_milp_beats_greedy(case) -> None:
    servers, volumes, policy = case
    quick = greedy(volumes, servers, policy)
    best = optimise(volumes, servers, policy, gap=1e-6)
    check_rules(quick.decisions, servers, volumes, policy)
    check_rules(best.decisions, servers, volumes, policy)
    assert best.placed >= quick.placed
    if best.placed == quick.placed:
        assert best.total_score >= quick.total_score - 1e-6 * max(1.0, best.total_score)
