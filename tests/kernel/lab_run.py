"""One guest boot that serves every kernel test: dm-era, a dm-linear swap, the NBD client,
`shadowblk track --dm-era` shipping to a shadow, `shadowblk attach --dm` against the router.

Booting is the slow part under TCG (15-60 s), so the checks run as parts of one boot, each with
its own result folder and exit status; the tests then look at their own part.
"""

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.delta_driver import make_key
from tests.manager_lab import register_servers, start_manager
from tests.procs import SHADOWBLK, Processes, free_port
from tools.kernel_lab import GuestResult, run_guest
from tools.kernel_lab.initramfs import REPO

GUEST = Path(__file__).parent / "guest"
MIB = 1 << 20


@dataclass(frozen=True)
class EraCase:
    """A dm-era device in the guest, the operations run on it and the blocks each era wrote."""

    name: str
    block_sectors: int
    origin_mib: int
    ops: tuple[str, ...]
    snapshot_eras: dict[int, set[int]]  # era -> blocks, as seen by the metadata snapshot
    live_eras: dict[int, set[int]]  # era -> blocks in the live metadata, after the last resume
    snapshot_era: int  # the current era recorded in the snapshot (the era after the snap)
    final_era: int  # the live current era after the last resume

    def expected(self, since: int, snapshot: bool) -> set[int]:
        """Blocks last written in an era >= SINCE: what era_invalidate --written-since lists."""
        eras = self.snapshot_eras if snapshot else self.live_eras
        blocks = (
            set(range(self.origin_mib * MIB // (self.block_sectors * 512))) if since == 0 else set()
        )
        for era, written in eras.items():
            if era >= since:
                blocks |= written
        return blocks


def _writes(ops: tuple[str, ...]) -> dict[int, set[int]]:
    """Era -> blocks written in it, for OPS starting in era 1 (c and s each start a new era)."""
    era, eras = 1, {}
    for op in ops:
        if op.startswith("w:"):
            first, _, end = op[2:].partition("-")
            blocks = range(int(first), int(end)) if end else [int(first)]
            eras.setdefault(era, set()).update(blocks)
        elif op in ("c", "s"):
            era += 1
    return eras


def era_case(name: str, block_sectors: int, origin_mib: int, ops: tuple[str, ...]) -> EraCase:
    """An EraCase whose expectations follow from OPS.

    Every resume rolls the era over (era 1 starts at the first resume), so the final
    suspend/resume of era.sh archives the last era's writes into the live writeset tree.
    """
    snap_at = ops.index("s")
    rollovers = sum(op in ("c", "s") for op in ops)
    snapshot_era = 2 + sum(op in ("c", "s") for op in ops[:snap_at])
    return EraCase(name, block_sectors, origin_mib, ops, _writes(ops[:snap_at]), _writes(ops),
                   snapshot_era, 2 + rollovers)  # fmt: skip


# 64 KiB blocks, nothing after the snapshot: era_invalidate 0.9.0 reads the live metadata even
# with --metadata-snapshot (see docs/dm-era.md), so only here do both views agree by design
SMALL = era_case("era_small", 128, 128, ("w:0", "w:5", "w:100", "c", "w:7", "w:2047", "s"))
# 4 KiB blocks over 2 GiB: 524288 blocks, a 516-block era array under a two-level btree
BIG = era_case("era_big", 8, 2048, ("w:0-3", "w:1017", "w:1018", "w:300000", "c", "w:1",
                                     "w:256535-256538", "w:524287", "c", "w:4096-4101", "w:0",
                                     "s", "w:9", "c"))  # fmt: skip


@dataclass
class LabRun:
    """The one boot's result and the host files behind the guest's disks."""

    result: GuestResult
    images: dict[str, Path]
    hosts_marker: bytes
    eras: tuple[EraCase, ...] = (SMALL, BIG)
    servers: dict[str, Path] = field(default_factory=dict)
    shadow_dir: Path | None = None  # the data folder of the shadow `track` ships to

    def part(self, name: str) -> tuple[int | None, str]:
        """A part's exit status and log."""
        folder = self.result.outdir / name
        rc = (folder / "rc").read_text().strip() if (folder / "rc").exists() else None
        log = (folder / "log").read_text() if (folder / "log").exists() else ""
        return (int(rc) if rc is not None else None), log


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _gpt(path: Path, names: tuple[str, ...]) -> Path:
    """A disk image with a GPT of 2 MiB partitions named NAMES (what the udev rule matches)."""
    _sparse(path, (len(names) * 2 + 2) * MIB)
    table = "label: gpt\n" + "".join(f"size=2MiB, name={n}\n" for n in names)
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True)
    return path


def _wait_listening(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def nbd_servers(work: Path, marker: bytes) -> Iterator[tuple[dict[str, int], dict[str, Path]]]:
    """The host's servers: nbdkit and `shadowblk serve` for the NBD client parts, each over a
    64 MiB file with MARKER at block 10; a primary (`shadowblk serve`) and a shadow (nbdkit,
    cache=none) over one 64 MiB file for the switchover part (what one acknowledged the other
    reads, through the host's page cache); a `shadowblk shadow` for the track part; a manager
    (_manager) for the udev and switch parts."""
    procs = Processes(work)
    files = {}
    for name in ("nbdkit", "shadowblk"):
        files[name] = _sparse(work / f"nbd-{name}.img", 64 * MIB)
        with open(files[name], "r+b") as f:
            f.seek(10 * 4096)
            f.write(marker)
    files["switch"] = _sparse(work / "switch.img", 64 * MIB)
    try:
        ports = {"NBDKIT_PORT": free_port()}
        _nbdkit(procs, ports["NBDKIT_PORT"], files["nbdkit"])
        ports["SHADOWBLK_PORT"] = _serve(procs, files["shadowblk"])
        ports["SWITCH_PRIMARY_PORT"], ports["SWITCH_SHADOW_PORT"] = switch_servers(
            procs, files["switch"]
        )
        files["key"] = make_key(work / "hmac.key")
        shadow = procs.start([*SHADOWBLK, "shadow", "--listen", "127.0.0.1:0", "--data-dir",
                              str(work / "shadow"), "--hmac-key-file", str(files["key"])],
                             "shadow")  # fmt: skip
        ports["TRACK_SHADOW_PORT"] = int(procs.wait_ready(shadow, timeout=60).rsplit(":", 1)[1])
        ports["MANAGER_PORT"], files["manager_token"] = _manager(procs, work, ports)
        yield ports, files
    finally:
        procs.stop_all()  # SIGTERM first for a clean flush, SIGKILL after 5 s


def switch_servers(procs: Processes, image: Path) -> tuple[int, int]:
    """The ports of a primary (`shadowblk serve`) and a shadow (`nbdkit file cache=none`) over
    one IMAGE, as in the router tests: what one acknowledged the other reads, through the host's
    page cache, so a swap between them loses nothing."""
    shadow = free_port()
    _nbdkit(procs, shadow, image, "cache=none")
    return _serve(procs, image), shadow


def _nbdkit(procs: Processes, port: int, image: Path, *extra: str) -> None:
    procs.start(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(image),
                 *extra], f"nbdkit-{port}")  # fmt: skip
    _wait_listening(port)


def _serve(procs: Processes, image: Path) -> int:
    """`shadowblk serve IMAGE` as export `vol` on a free port of 127.0.0.1; the port."""
    serve = procs.start([*SHADOWBLK, "serve", str(image), "--listen", "127.0.0.1:0",
                         "--name", "vol"], f"serve-{image.stem}")  # fmt: skip
    url = procs.wait_ready(serve, timeout=60).split()[1]  # nbd://127.0.0.1:PORT/vol
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _manager(procs: Processes, work: Path, ports: dict[str, int]) -> tuple[int, Path]:
    """A manager (its port, its token file) with servers s1-s3 (never timed out) and, both on
    s1: vol1 for the udev part (no shadow could take over: the refusal of its emergency shows
    that the guest's call reached the manager and was planned), vol for the switch part, whose
    primary endpoint (s1's report) is the switch primary as the guest reaches it."""
    lab = start_manager(procs, f"sqlite:{work / 'manager.db'}", work, "manager",
                        "--heartbeat-timeout", "3600")  # fmt: skip
    register_servers(lab)
    client = lab.client()
    for name in ("vol1", "vol"):
        client.create_volume(name=name, size_bytes=64 * MIB, shadows=1, primary="s1")
    endpoint = f"nbd://10.0.2.2:{ports['SWITCH_PRIMARY_PORT']}/vol"
    client.heartbeat("s1", used_bytes=0, hosted={"vol": {
        "role": "primary", "state": "running", "endpoint": endpoint, "generation": 1}})  # fmt: skip
    return int(lab.url.rsplit(":", 1)[1]), lab.token_file


PARTS = (f"{SMALL.name}:era", f"{BIG.name}:era", "era_live:era-live", "swap:linear-swap",
         "nbd_nbdkit:nbd", "nbd_shadowblk:nbd", "track:track", "switch:switch",
         "udev:udev")  # fmt: skip


def boot_lab(work: Path, timeout: float = 1320, parts: tuple[str, ...] = PARTS) -> LabRun:
    """Make the disks, start the servers, run PARTS (NAME:SCRIPT) in one guest, stop them."""
    images = {
        "small_meta": _sparse(work / "small-meta.img", 8 * MIB),
        "small_origin": _sparse(work / "small-origin.img", SMALL.origin_mib * MIB),
        "big_meta": _sparse(work / "big-meta.img", 16 * MIB),
        "big_origin": _sparse(work / "big-origin.img", BIG.origin_mib * MIB),
        "swap_old": _sparse(work / "swap-old.img", 64 * MIB),
        "swap_new": _sparse(work / "swap-new.img", 64 * MIB),
        "live_meta": _sparse(work / "live-meta.img", 8 * MIB),
        "live_origin": _sparse(work / "live-origin.img", 64 * MIB),
        "track_meta": _sparse(work / "track-meta.img", 8 * MIB),
        "track_origin": _sparse(work / "track-origin.img", 32 * MIB),
        "udev_disk": _gpt(work / "udev-disk.img", ("sbk-vol2", "plain2")),
    }  # vda .. vdk, in this order
    env = {
        f"ARGS_{SMALL.name}": f"{SMALL.name} /dev/vda /dev/vdb {SMALL.block_sectors} "
        + " ".join(SMALL.ops),
        f"ARGS_{BIG.name}": f"{BIG.name} /dev/vdc /dev/vdd {BIG.block_sectors} "
        + " ".join(BIG.ops),
        "ARGS_swap": "/dev/vde /dev/vdf",
        "PART_TIMEOUT": "420",  # the parts that start the host's Python: 10-60 s per start
        "ARGS_era_live": f"/dev/vdg /dev/vdh {REPO}",
    }
    script = "#!/bin/sh\nexec sh /klab/run-parts.sh " + " ".join(parts) + "\n"
    files = {p.name: p for p in GUEST.glob("*.sh")}
    marker = b"marker-from-the-host\n"
    with nbd_servers(work, marker) as (ports, servers):
        env["ARGS_nbd_nbdkit"] = f"/dev/nbd0 {ports['NBDKIT_PORT']} vol"
        env["ARGS_nbd_shadowblk"] = f"/dev/nbd1 {ports['SHADOWBLK_PORT']} vol"
        env["ARGS_track"] = (f"/dev/vdi /dev/vdj {REPO} {ports['TRACK_SHADOW_PORT']} "
                             f"{servers['key']}")  # fmt: skip
        manager = f"http://10.0.2.2:{ports['MANAGER_PORT']}"
        token = servers["manager_token"].read_text().strip()
        env["ARGS_switch"] = (f"{REPO} {ports['SWITCH_PRIMARY_PORT']} "
                              f"{ports['SWITCH_SHADOW_PORT']} {manager} {token}")  # fmt: skip
        # vdf: read only, after swap
        env["ARGS_udev"] = f"{REPO} {manager} {token} /dev/vdf /dev/vdk1 /dev/vdk2"
        result = run_guest(script, list(images.values()), timeout, work / "out",
                           host_ports=ports, env=env, files=files, host_root=True)  # fmt: skip
    return LabRun(result, images, marker, servers=servers, shadow_dir=work / "shadow")
