"""The agent's hosting state, in process on real files: orders applied, the `serve` command
line each primary gets, ports from a base, drops removing files, agent.json surviving a
restart. No child is started here (tests/integration/test_agent_*.py run the processes)."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from shadowblk.agent.hosting import Endpoint, Hosting, Replication
from shadowblk.delta.volume_state import VolumeState

ADDRESSES = {"s2": "10.0.0.2:7700", "s3": "10.0.0.3:7700"}


def volume(name: str, shadows: list[str], mode: str = "sync") -> dict[str, Any]:
    return {
        "name": name, "size_bytes": 1 << 20, "primary": "s1", "block_size": 512, "mode": mode,
        "shadows_wanted": len(shadows), "generation": 1,
        "shadows": [{"server": s, "state": "syncing"} for s in shadows],
    }  # fmt: skip


def order(seq: int, kind: str, role: str, vol: dict[str, Any]) -> dict[str, Any]:
    return {"seq": seq, "kind": kind, "subject": vol["name"],
            "detail": {"server": "s1", "role": role, "volume": vol}}  # fmt: skip


def hosting(tmp_path: Path, supported: bool = True, nbd: str = "127.0.0.1:0") -> Hosting:
    def address(server: str) -> str:
        if server not in ADDRESSES:
            raise LookupError(f"{server} unknown")
        return ADDRESSES[server]

    return Hosting(
        tmp_path,
        Endpoint.parse("127.0.0.1:0"),
        Endpoint.parse(nbd),
        Replication(supported, tmp_path / "hmac.key", address),
    )


def option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_primary_order_gives_a_serve_with_its_shadows(tmp_path: Path) -> None:
    h = hosting(tmp_path)
    h.apply(order(3, "host-volume", "primary", volume("v1", ["s2", "s3"])))
    argv = h.children["v1"].argv()
    assert argv[argv.index("serve") + 1] == str(tmp_path / "primaries" / "v1.img")
    assert option(argv, "--shadow") == ["10.0.0.2:7700", "10.0.0.3:7700"]
    assert option(argv, "--mode") == ["sync"] and option(argv, "--block-size") == ["512"]
    assert option(argv, "--listen") == ["127.0.0.1:0"]
    assert h.orders_since == 3


def test_without_replication_serve_gets_no_shadow_flags(tmp_path: Path) -> None:
    h = hosting(tmp_path, supported=False)
    h.apply(order(1, "host-volume", "primary", volume("v1", ["s2"])))
    argv = h.children["v1"].argv()
    assert "--shadow" not in argv and "--hmac-key-file" not in argv


def test_unknown_shadow_address_puts_the_start_off(tmp_path: Path) -> None:
    h = hosting(tmp_path)
    h.apply(order(1, "host-volume", "primary", volume("v1", ["s9"])))
    child = h.children["v1"]
    child.tick(0.0)
    assert child.proc is None and "s9 unknown" in child.last_error
    assert h.report()["v1"] == {"role": "primary", "state": "backoff", "generation": 1}


def test_ports_from_a_base_are_distinct_and_kept(tmp_path: Path) -> None:
    h = hosting(tmp_path, nbd="127.0.0.1:10809")
    for seq, name in enumerate(["v1", "v2", "v3"], 1):
        h.apply(order(seq, "host-volume", "primary", volume(name, [])))
    ports = [option(h.children[n].argv(), "--listen") for n in ("v1", "v2", "v3")]
    assert ports == [["127.0.0.1:10809"], ["127.0.0.1:10810"], ["127.0.0.1:10811"]]
    h.save()
    again = hosting(tmp_path, nbd="127.0.0.1:10809")
    assert option(again.children["v2"].argv(), "--listen") == ["127.0.0.1:10810"]
    assert again.orders_since == 3 and set(again.volumes) == {"v1", "v2", "v3"}


def test_drop_removes_the_files_of_its_role(tmp_path: Path) -> None:
    h = hosting(tmp_path)
    h.apply(order(1, "host-volume", "primary", volume("v1", [])))
    h.apply(order(2, "host-volume", "shadow", volume("v2", [])))
    (tmp_path / "primaries" / "v1.img").write_bytes(b"x")
    (tmp_path / "primaries" / "v1.state").mkdir()
    (tmp_path / "primaries" / "v1.state" / "bitmap").write_bytes(b"x")
    for suffix in (".img", ".state", ".journal"):
        (tmp_path / "shadows" / f"v2{suffix}").write_bytes(b"x")
    (tmp_path / "shadows" / "v22.img").write_bytes(b"x")  # another volume's file stays
    assert h.report()["v2"] == {"role": "shadow", "state": "starting", "generation": 1}
    h.apply(order(5, "drop-volume", "primary", volume("v1", [])))
    h.apply(order(6, "drop-volume", "shadow", volume("v2", [])))
    assert sorted(p.name for p in (tmp_path / "primaries").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "shadows").iterdir()) == ["v22.img"]
    assert h.volumes == {} and h.children == {} and h.orders_since == 6


def test_an_ordered_promotion_takes_the_shadow_copy(tmp_path: Path) -> None:
    h = hosting(tmp_path)
    h.apply(order(1, "host-volume", "shadow", volume("v1", [])))
    h.apply(order(2, "host-volume", "primary", volume("v1", [])))
    assert h.volumes["v1"]["role"] == "shadow"  # no applied epoch: never an empty primary
    (tmp_path / "shadows" / "v1.img").write_bytes(bytes(1 << 20))
    VolumeState("v1", 1 << 20, 512, 1, 3).save(tmp_path / "shadows" / "v1.state")
    h.apply(order(3, "host-volume", "primary", volume("v1", ["s2"])))
    assert h.volumes["v1"]["role"] == "primary" and "v1" in h.children
    assert (tmp_path / "primaries" / "v1.img").exists()
    assert not (tmp_path / "shadows" / "v1.img").exists()
    replication = tmp_path / "primaries" / "v1.state" / "replication"
    assert json.loads((replication / "shadow-10.0.0.2-7700.json").read_text()) == {"acked": 3}
    assert json.loads((replication / "replicator.json").read_text())["reserved"] == 4


def test_new_shadows_restart_the_primary(tmp_path: Path) -> None:
    h = hosting(tmp_path)
    h.apply(order(1, "host-volume", "primary", volume("v1", ["s2"])))
    child = h.children["v1"]
    child.argv = lambda: ["sleep", "60"]  # a stand-in process: only its stop is looked at
    child.tick(0.0)
    running = child.proc
    assert running is not None
    h.apply(order(2, "host-volume", "primary", volume("v1", ["s2"])))
    assert child.proc is running  # the same shadows: left alone
    h.apply(order(3, "host-volume", "primary", volume("v1", ["s3"])))
    assert child.proc is None and running.returncode is not None  # started again at next tick
    assert option(h._serve_argv("v1", h.volumes["v1"]), "--shadow") == ["10.0.0.3:7700"]


def test_unknown_orders_are_skipped_but_read(tmp_path: Path) -> None:
    h = hosting(tmp_path)
    h.apply({"seq": 9, "kind": "scrub-volume", "subject": "v1", "detail": {}})
    assert h.volumes == {} and h.orders_since == 9


@pytest.mark.parametrize("text", ["nohost", "host:", ":80", "h:70000", "h:x"])
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(text)


def test_ipv6_endpoint() -> None:
    assert Endpoint.parse("[::1]:0").with_port(5) == "[::1]:5"


def test_the_zygote_socket_is_in_a_private_folder(tmp_path: Path) -> None:
    near = hosting(tmp_path)
    assert near.zygote_socket.parent == tmp_path / "run"
    long_dir = tmp_path / ("d" * 120)
    long_dir.mkdir()
    far = hosting(long_dir)  # a socket path there would not fit sockaddr_un
    assert len(str(far.zygote_socket)) <= 100 and not far.private_dir.is_relative_to(long_dir)
    for h in (near, far):
        st = h.private_dir.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        h.stop()
    assert not far.private_dir.exists() and near.private_dir.exists()


def test_holds_change_under_the_lock_the_loop_reads_them_with(tmp_path: Path) -> None:
    """The control endpoint's threads change the holds the loop's tick iterates (the shadow
    server's argv): a change waits for the lock, else the tick can fail mid-iteration."""
    h = hosting(tmp_path)
    for change, held in ((lambda: h._hand_over("v1", 30), True), (lambda: h._unhold("v1"), False)):
        with h.lock:
            before = dict(h.shadow_holds)
            thread = threading.Thread(target=change)
            thread.start()
            thread.join(0.3)
            assert thread.is_alive() and h.shadow_holds == before  # waits for the lock
        thread.join(10)
        assert ("v1" in h.holds_left()) is held
        assert any(a.startswith("--hold=v1=") for a in h._shadow_argv()) is held
