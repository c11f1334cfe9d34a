"""The target agent's compare that carries the promotion (`crcs` with "promote", a planned
switchover's pause: RoleChanges.compare_promote), in process on real image, map and state
files: blocks that differ are answered without any promotion (the shadow's files stay where
they are, handed over for the repair); a promotion that fails after an equal compare is
answered with the crcs and the error, the volume still a shadow here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shadowblk.agent import dirty_check
from shadowblk.agent.hosting import Hosting
from shadowblk.integrity.checksum_map import ChecksumMap
from tests.unit.test_agent_hosting import hosting, order, volume

BS = 512
BLOCKS = [3, 9]


def shadow_copy(tmp_path: Path) -> tuple[Hosting, dict]:
    """A hosting with v1 a shadow here: its image (blocks 3 and 9 written), map and state."""
    h = hosting(tmp_path)
    vol = volume("v1", [])
    h.apply(order(1, "host-volume", "shadow", vol))
    image = tmp_path / "shadows" / "v1.img"
    data = bytearray(1 << 20)
    for block in BLOCKS:
        data[block * BS : (block + 1) * BS] = bytes([block]) * BS
    image.write_bytes(bytes(data))
    ChecksumMap.build(image, tmp_path / "shadows" / "v1.map", BS).close()
    return h, {**vol, "generation": 2}


def body(expected: np.ndarray, after: dict) -> dict:
    total = (1 << 20) // BS
    blocks = dirty_check.pack_blocks(np.array(BLOCKS), total)
    return {"blocks": blocks, "generation": 2, "expected": dirty_check.pack(expected),
            "promote": {"volume": after}}  # fmt: skip


def right_crcs(tmp_path: Path) -> np.ndarray:
    return dirty_check.data_crcs(tmp_path / "shadows" / "v1.img", np.array(BLOCKS), BS)


def test_blocks_that_differ_are_answered_and_nothing_is_promoted(tmp_path: Path) -> None:
    h, after = shadow_copy(tmp_path)
    wrong = right_crcs(tmp_path).copy()
    wrong[1] ^= 1  # what the old primary's map says of block 9 differs
    answer = h.compare_promote("v1", body(wrong, after), after)
    assert answer["promoted"] is None and "promote_error" not in answer, answer
    assert dirty_check.unpack(answer["crcs"]).tolist() == right_crcs(tmp_path).tolist()
    assert h.volumes["v1"]["role"] == "shadow"
    assert (tmp_path / "shadows" / "v1.img").exists()
    assert not (tmp_path / "primaries" / "v1.img").exists()
    assert "v1" in h.holds_left()  # handed over: the repair writes a map nobody holds
    assert (tmp_path / "verified" / "v1.npz").exists()  # the map kept as compared


def test_a_promotion_that_fails_after_an_equal_compare_leaves_a_shadow(tmp_path: Path) -> None:
    h, after = shadow_copy(tmp_path)  # no state file: the shadow never applied an epoch
    answer = h.compare_promote("v1", body(right_crcs(tmp_path), after), after)
    assert answer["promoted"] is None, answer
    assert "no shadow state to promote" in answer["promote_error"], answer
    assert h.volumes["v1"]["role"] == "shadow" and "v1" not in h.children
    assert (tmp_path / "shadows" / "v1.img").exists()
    assert not (tmp_path / "primaries" / "v1.img").exists()
