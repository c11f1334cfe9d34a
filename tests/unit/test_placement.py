"""Placement: hard rules with reasons, scoring, forcing, and a case where greedy fails."""

from shadowblk.manager.placement import Policy, place
from shadowblk.manager.placement_batch import greedy, optimise
from shadowblk.manager.store.model import Server, ServerState, Shadow, Volume

GIB = 2**30


def server(name: str, zone: str, rack: str = "r1", **kw) -> Server:
    kw.setdefault("capacity_bytes", 100 * GIB)
    kw.setdefault("drive_models", ["M2"])
    return Server(name, zone=zone, rack=rack, **kw)


FLEET = [
    server("p1", "a", drive_models=["M1"]),
    server("same-zone", "a", "r2"),
    server("same-model", "b", drive_models=["M1", "M9"]),
    server("good", "c"),
    server("risky", "b", "r2", failure_probability=0.7),
    server("full", "c", "r2", used_bytes=95 * GIB),
    server("down", "d", state=ServerState.DOWN),
    server("busy", "d", "r2", io_load=0.95),
]


def volume(name: str = "v1", primary: str = "p1", size_gib: int = 10, **kw) -> Volume:
    return Volume(name, size_bytes=size_gib * GIB, primary=primary, **kw)


def test_best_candidate_wins_and_every_rejection_says_why() -> None:
    decision = place(volume(), FLEET)
    assert decision.chosen == ["good"]
    verdicts = {c.server: c for c in decision.candidates}
    assert not verdicts["p1"].accepted and "is the primary" in verdicts["p1"].reasons
    expect = {
        "same-zone": "same zone as the primary (a)",
        "risky": "predicted failure probability 0.70",
        "full": "not enough free space",
        "down": "server is down",
        "busy": "no performance headroom",
    }
    for name, reason in expect.items():
        assert not verdicts[name].accepted
        assert any(reason in r for r in verdicts[name].reasons), verdicts[name].reasons
    twin = verdicts["same-model"]
    assert twin.accepted
    assert any("same drive model as the primary (M1)" in r for r in twin.reasons)
    assert 0 < twin.score < verdicts["good"].score
    text = decision.explain()
    assert text.splitlines()[0] == "volume v1: 1 of 1 shadow(s) placed"
    assert "good" in text.splitlines()[1] and "CHOSEN" in text.splitlines()[1]
    assert all(s.name in text for s in FLEET)
    assert decision.warnings == []


def test_two_shadows_go_to_two_racks() -> None:
    fleet = [server("p1", "a"), server("b1", "b"), server("b1-twin", "b"), server("c1", "c")]
    decision = place(volume(shadows_wanted=2), fleet)
    assert sorted(decision.chosen) == ["b1", "c1"] or sorted(decision.chosen) == ["b1-twin", "c1"]


def test_primary_zone_only_when_forced_and_then_said() -> None:
    fleet = [server("p1", "a"), server("a2", "a", "r2")]
    refused = place(volume(), fleet)
    assert refused.chosen == []
    assert refused.warnings == ["only 0 of 1 missing shadow(s) could be placed"]
    forced = place(volume(), fleet, Policy(force_same_domain=True))
    assert forced.chosen == ["a2"]
    assert forced.warnings == ["a2: FORCED: same zone as the primary (a)"]
    assert "WARNING: a2: FORCED" in forced.explain()


def test_existing_shadows_count_and_their_rack_is_taken() -> None:
    fleet = [server("p1", "a"), server("b1", "b"), server("b1-twin", "b"), server("c1", "c")]
    v = volume(shadows_wanted=2, shadows=[Shadow("b1")])
    decision = place(v, fleet)
    assert decision.chosen == ["c1"]
    twin = next(c for c in decision.candidates if c.server == "b1-twin")
    assert "same rack as another shadow of this volume (b/r1)" in twin.reasons


def test_greedy_strands_a_volume_that_the_milp_places() -> None:
    """`wide` may go to A or B and prefers A (idle); `narrow`'s primary is in B's zone, so only
    A can take it. Each server fits one volume. Greedy gives A to `wide` (first: the larger)
    and strands `narrow`; the MILP puts `wide` on B and `narrow` on A."""
    fleet = [
        server("pw", "x", used_bytes=100 * GIB),
        server("pn", "b", "r9", used_bytes=100 * GIB),
        server("A", "a", capacity_bytes=60 * GIB),
        server("B", "b", capacity_bytes=60 * GIB, io_load=0.5),
    ]
    volumes = [volume("wide", "pw", 55), volume("narrow", "pn", 50)]
    bad = greedy(volumes, fleet)
    assert bad.decisions["wide"].chosen == ["A"]
    assert bad.unplaced == {"narrow": 1}
    good = optimise(volumes, fleet)
    assert (good.decisions["wide"].chosen, good.decisions["narrow"].chosen) == (["B"], ["A"])
    assert good.placed == 2 and good.unplaced == {}
    assert good.total_score > bad.total_score


def test_milp_scales_to_a_fleet() -> None:
    """300 volumes, 2 shadows each, on 40 servers in 4 zones filled to ~75 %: all placed,
    within capacity (its speed is a benchmark's business, not this test's)."""
    fleet = [
        server(f"s{i}", f"z{i % 4}", f"r{i % 5}", capacity_bytes=600 * GIB, io_load=(i % 7) / 10)
        for i in range(40)
    ]
    volumes = [volume(f"v{i}", f"s{i % 40}", 10 + i % 40, shadows_wanted=2) for i in range(300)]
    plan = optimise(volumes, fleet)
    assert plan.placed == 600
    used = {s.name: 0 for s in fleet}
    for v in volumes:
        for name in plan.decisions[v.name].chosen:
            used[name] += v.size_bytes
    assert max(used[s.name] - s.capacity_bytes for s in fleet) <= 0
