"""Hash-tree compare as a message exchange: finds exactly the differing blocks, in few bytes,
and leaves blocks in flight out of the verdict."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowblk.integrity.checksum_map import ChecksumMap
from shadowblk.integrity.hash_tree import HashTree
from shadowblk.integrity.tree_compare import (
    GeometryMismatch,
    ProtocolError,
    TreeResponder,
    compare,
    encode_children,
    recheck,
)
from shadowblk.tracking.bitmap import DirtyBitmap

BS = 4096
GIB_BLOCKS = (1 << 30) // BS  # 262,144
KIB = 1024


def random_crcs(blocks: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 32, blocks, dtype=np.uint32)


def brute_force(a: np.ndarray, b: np.ndarray) -> list[int]:
    return (np.nonzero(a != b)[0] * BS).tolist()


@pytest.mark.parametrize(("fanout", "digest"), [(64, 8), (256, 16)])
def test_one_gib_volumes_compare_in_a_few_kib(fanout: int, digest: int) -> None:
    ours = random_crcs(GIB_BLOCKS)
    theirs = ours.copy()
    local = HashTree(ours, BS, fanout=fanout, digest_size=digest)
    remote = HashTree(theirs, BS, fanout=fanout, digest_size=digest)
    same = compare(local, TreeResponder(remote).handle)
    assert same.differing == [] and same.deferred == []
    assert same.bytes_exchanged <= 64 * KIB

    theirs[200_001] ^= 0x40
    remote.refresh(200_001 * BS, BS)
    one = compare(local, TreeResponder(remote).handle)
    assert one.differing == [200_001 * BS]
    assert one.bytes_exchanged - same.bytes_exchanged <= 64 * KIB
    assert one.round_trips == local.depth + 1


def test_many_differences_cost_o_d_log_n() -> None:
    ours = random_crcs(GIB_BLOCKS)
    theirs = ours.copy()
    changed = np.random.default_rng(3).choice(GIB_BLOCKS, 100, replace=False)
    theirs[changed] += 1
    local, remote = HashTree(ours, BS), HashTree(theirs, BS)
    result = compare(local, TreeResponder(remote).handle)
    assert result.differing == sorted((changed * BS).tolist())
    per_difference = 64 * 8 * (local.depth - 1) + 64 * 4  # a node's children per level, a leaf
    assert result.bytes_exchanged <= 100 * per_difference + 1024


@settings(max_examples=60, deadline=None)
@given(
    blocks=st.integers(1, 3000),
    fanout=st.integers(2, 300),
    leaf_blocks=st.integers(1, 100),
    digest=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0, 0.2),
    exclude_density=st.floats(0, 0.5),
)
def test_compare_equals_brute_force(
    blocks, fanout, leaf_blocks, digest, seed, density, exclude_density
) -> None:
    rng = np.random.default_rng(seed)
    ours = random_crcs(blocks, seed)
    theirs = ours.copy()
    theirs[rng.random(blocks) < density] ^= 1
    excluded = DirtyBitmap(blocks * BS, BS)
    for block in np.nonzero(rng.random(blocks) < exclude_density)[0].tolist():
        excluded.mark(block * BS, BS)
    trees = [HashTree(c, BS, fanout, leaf_blocks, digest) for c in (ours, theirs)]
    result = compare(trees[0], TreeResponder(trees[1]).handle, exclude=excluded)
    expected = brute_force(ours, theirs)
    assert result.differing == [off for off in expected if not excluded.test(off)]
    # excluded blocks seen to differ; wholly excluded subtrees are not even looked at
    assert set(result.deferred) <= {off for off in expected if excluded.test(off)}


def test_refresh_equals_a_fresh_tree() -> None:
    crcs = random_crcs(10_000)
    tree = HashTree(crcs, BS, fanout=16, leaf_blocks=8)
    crcs[1234:1300] += 7
    tree.refresh(1234 * BS, 66 * BS)
    assert tree.levels == HashTree(crcs.copy(), BS, fanout=16, leaf_blocks=8).levels


def writes_during_compare(
    responder: TreeResponder, after_trips: int, action: Callable[[], None]
) -> Callable[[bytes], bytes]:
    """A transport that runs `action` (a write on the primary) after some round trips."""
    trips = 0

    def send(request: bytes) -> bytes:
        nonlocal trips
        trips += 1
        if trips == after_trips:
            action()
        return responder.handle(request)

    return send


def test_block_written_during_the_compare_is_deferred_not_a_discrepancy() -> None:
    """The primary writes block 777 while the compare runs; the shadow has not got it yet."""
    ours = random_crcs(GIB_BLOCKS // 16)
    theirs = ours.copy()
    local, remote = HashTree(ours, BS), HashTree(theirs, BS)
    dirty = DirtyBitmap(len(ours) * BS, BS)

    def primary_write() -> None:
        ours[777] += 1
        local.refresh(777 * BS, BS)
        dirty.mark(777 * BS, 100)

    theirs[5000] += 1  # a real discrepancy, never dirty
    remote.refresh(5000 * BS, BS)
    result = compare(local, writes_during_compare(TreeResponder(remote), 1, primary_write), dirty)
    assert result.differing == [5000 * BS]
    assert result.deferred == [777 * BS]

    theirs[777] = ours[777]  # the shadow applies and acknowledges the epoch
    remote.refresh(777 * BS, BS)
    dirty.clear(777 * BS, 100)
    again = recheck(local, TreeResponder(remote).handle, result.deferred, dirty)
    assert again.differing == [] and again.deferred == []


def test_wholly_excluded_subtrees_are_not_descended() -> None:
    ours = random_crcs(GIB_BLOCKS // 16)
    theirs = ours.copy()
    theirs[:4096] += 1  # a busy region, all in flight
    local, remote = HashTree(ours, BS), HashTree(theirs, BS)
    dirty = DirtyBitmap(len(ours) * BS, BS)
    dirty.mark(0, 4096 * BS)
    full = compare(local, TreeResponder(remote).handle)
    skipped = compare(local, TreeResponder(remote).handle, dirty)
    assert len(full.differing) == 4096 and skipped.differing == []
    assert skipped.bytes_exchanged < full.bytes_exchanged / 10


def test_geometry_mismatch_is_refused() -> None:
    local = HashTree(random_crcs(1000), BS, fanout=64)
    with pytest.raises(GeometryMismatch):
        compare(local, TreeResponder(HashTree(random_crcs(1000), BS, fanout=32)).handle)
    with pytest.raises(GeometryMismatch):
        compare(local, TreeResponder(HashTree(random_crcs(1001), BS, fanout=64)).handle)


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        (b"", "empty request"),
        (b"\x07", "unknown request type"),
        (b"\x01x", "no arguments"),
        (b"\x02\x00", "shorter than 3"),
        (b"\x02\x00\x02\x80", "truncated varint"),
        (b"\x02\x09\x01\x00", "beyond the tree"),
        (encode_children(0, [10_000]), "beyond level 0"),
        (encode_children(0, [1]) + b"zz", "trailing bytes"),
        (b"\x02\x00" + b"\xff" * 10 + b"\x01", "varint longer"),
        (b"\x02\x00\xa0\x9c\x01", "nodes in one request"),
    ],
)
def test_bad_requests_get_an_error_reply(request_bytes: bytes, message: str) -> None:
    reply = TreeResponder(HashTree(random_crcs(5000), BS)).handle(request_bytes)
    assert reply[0] == 0xFF
    assert message in reply[1:].decode()


def test_error_and_short_replies_raise_protocol_errors() -> None:
    local = HashTree(random_crcs(5000), BS)
    remote = TreeResponder(HashTree(random_crcs(5000, seed=1), BS))
    with pytest.raises(ProtocolError, match="peer refused"):
        compare(local, lambda _: b"\xffno")
    with pytest.raises(ProtocolError, match="impossible geometry"):
        compare(local, lambda _: b"\x01" + bytes(21 + 8))
    with pytest.raises(ProtocolError, match="too short"):
        compare(local, lambda req: remote.handle(req)[:-1] if req[0] == 2 else remote.handle(req))


def test_two_real_one_gib_volumes_compare_through_their_maps(tmp_path: Path) -> None:
    """1 GiB image files (sparse, with some data), maps built from disk; then one byte written
    on the shadow only, through the apply path's map update."""
    images = [tmp_path / "primary.img", tmp_path / "shadow.img"]
    payload = np.random.default_rng(4).bytes(1 << 20)
    for image in images:
        with image.open("wb") as f:
            f.truncate(1 << 30)
            f.seek(300 << 20)
            f.write(payload)
    maps = [ChecksumMap.build(img, img.with_suffix(".map")) for img in images]
    with maps[0], maps[1], images[1].open("r+b") as shadow:
        trees = [HashTree(m.crcs, BS) for m in maps]
        same = compare(trees[0], TreeResponder(trees[1]).handle)
        assert same.differing == [] and same.bytes_exchanged <= 64 * KIB

        offset = (300 << 20) + 5 * BS + 99
        shadow.seek(offset)
        shadow.write(b"\x00" if payload[5 * BS + 99] else b"\x01")
        shadow.flush()

        def read(off: int, length: int) -> bytes:
            shadow.seek(off)
            return shadow.read(length)

        maps[1].update(offset, b"\x00" if payload[5 * BS + 99] else b"\x01", read=read)
        trees[1].refresh(offset, 1)
        one = compare(trees[0], TreeResponder(trees[1]).handle)
    assert one.differing == [offset - offset % BS]
    assert one.bytes_exchanged - same.bytes_exchanged <= 64 * KIB
