"""`shadowblk serve`: export a volume over NBD with in-band write tracking."""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import re
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from shadowblk.delta.auth import AuthConfigError, client_tls_context, load_key
from shadowblk.delta.primary_state import PrimaryStateError
from shadowblk.delta.replicator import Replicator
from shadowblk.delta.volume_state import VOLUME_ID
from shadowblk.integrity.checksum_map import MapBusyError
from shadowblk.integrity.live_scrub import LiveVolume
from shadowblk.nbd import slowdisk
from shadowblk.nbd.backend import Backend, VolumeError
from shadowblk.nbd.checksums import ChecksumObserver
from shadowblk.nbd.fence import ControlSocket, Fence
from shadowblk.nbd.handshake import Export
from shadowblk.nbd.replication import ReplicationObserver
from shadowblk.nbd.scrub_control import open_endpoint
from shadowblk.nbd.server import NBDServer
from shadowblk.nbd.tls import TLSConfigError, server_context
from shadowblk.tracking.tracker import StateError, WriteTracker

log = logging.getLogger(__name__)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _load_native_loop() -> None:
    """Import the native NBD loop now: the server imports it when it is built, which for a
    standby is after `go`, in a switchover's pause (a shared object's load: ~5 ms on a busy
    machine). Not built: the server says so and serves from Python, as before."""
    with contextlib.suppress(ImportError):
        importlib.import_module("shadowblk._native.nbdloop")


def parse_size(text: str) -> int:
    """'1073741824', '64M', '1G', '2TiB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 4096, 64M or 1G")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT', ':PORT' or 'PORT' (host 127.0.0.1)."""
    match = re.fullmatch(r"(?:\[([^\]]+)\]|([^:\[\]]*)):(\d+)|(\d+)", text)
    if not match:
        raise click.BadParameter(f"{text!r} is not HOST:PORT")
    host = match.group(1) or match.group(2) or "127.0.0.1"
    port = int(match.group(3) or match.group(4))
    if port > 65535:
        raise click.BadParameter(f"port {port} is out of range")
    return host, port


@dataclass
class Replication:
    """The --shadow options: where and how the served volume is replicated."""

    shadows: tuple[str, ...]
    mode: str
    max_lag: float
    max_lag_bytes: int
    compress_level: int
    generation: int
    drain_timeout: float
    hmac_key_file: Path | None
    shadow_tls: tuple[Path | None, Path | None, Path | None]
    key: bytes | None = None  # loaded by check()
    tls: Any = None

    def check(self, export_name: str, state_dir: Path | None, read_only: bool) -> None:
        """Refuse bad combinations before anything is opened."""
        if not self.shadows:
            return
        if state_dir is None or read_only:
            raise click.UsageError("--shadow needs --state-dir (and a writable export)")
        if not VOLUME_ID.match(export_name):
            raise click.BadParameter(
                f"{export_name!r} is not a valid volume id ({VOLUME_ID.pattern})",
                param_hint="--name",
            )
        for spec in self.shadows:
            parse_listen(spec)
        if any(self.shadow_tls) and not all(self.shadow_tls):
            raise click.UsageError(
                "--shadow-tls-cert, --shadow-tls-key, --shadow-tls-ca go together"
            )
        if self.hmac_key_file is None and not all(self.shadow_tls):
            raise click.UsageError("--shadow needs --hmac-key-file or --shadow-tls-*")
        try:
            self.key = load_key(self.hmac_key_file) if self.hmac_key_file else None
            cert, key, ca = self.shadow_tls
            self.tls = client_tls_context(cert, key, ca) if cert and key and ca else None
        except AuthConfigError as exc:
            raise click.ClickException(str(exc)) from None

    def observer(
        self, volume_id: str, backend: Backend, block_size: int, state_dir: Path | None
    ) -> ReplicationObserver | None:
        if not self.shadows or state_dir is None:
            return None
        replicator = Replicator(
            volume_id,
            backend.fd,
            backend.size,
            list(self.shadows),
            state_dir / "replication",
            block_size=block_size,
            generation=self.generation,
            mode=self.mode,
            level=self.compress_level,
            max_lag_bytes=self.max_lag_bytes,
            cut_interval=self.max_lag,
            hmac_key=self.key,
            tls=self.tls,
        )
        return ReplicationObserver(replicator, state_dir)


def replication_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the --shadow options to a command and pass them as one `replication` argument."""
    options = [
        click.option(
            "--shadow",
            "shadows",
            multiple=True,
            help="HOST:PORT of a `shadowblk shadow` server; repeat for several shadows.",
        ),
        click.option(
            "--mode",
            type=click.Choice(["async", "sync"]),
            default="async",
            show_default=True,
            help="sync: a FLUSH is answered once every in-sync shadow applied it.",
        ),
        click.option(
            "--max-lag",
            type=float,
            default=1.0,
            show_default=True,
            help="Seconds after which written data is cut into an epoch and shipped.",
        ),
        click.option(
            "--max-lag-bytes",
            default="64M",
            show_default=True,
            help="Unshipped bytes held in memory before writes wait (back-pressure).",
        ),
        click.option("--compress-level", type=click.IntRange(1, 22), default=1, show_default=True),
        click.option(
            "--generation",
            type=click.IntRange(1),
            default=1,
            show_default=True,
            help="This primary's generation of the volume (a shadow with a newer one fences it).",
        ),
        click.option(
            "--drain-timeout",
            type=float,
            default=10.0,
            show_default=True,
            help="Seconds a clean stop waits for the shadows to apply everything.",
        ),
        click.option(
            "--hmac-key-file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Shared secret that authenticates the delta streams.",
        ),
        click.option(
            "--shadow-tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path)
        ),
        click.option(
            "--shadow-tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path)
        ),
        click.option(
            "--shadow-tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path)
        ),
    ]

    @functools.wraps(fn)
    def wrapper(**kw: Any) -> Any:
        kw["replication"] = Replication(
            shadows=kw.pop("shadows"),
            mode=kw.pop("mode"),
            max_lag=kw.pop("max_lag"),
            max_lag_bytes=parse_size(kw.pop("max_lag_bytes")),
            compress_level=kw.pop("compress_level"),
            generation=kw.pop("generation"),
            drain_timeout=kw.pop("drain_timeout"),
            hmac_key_file=kw.pop("hmac_key_file"),
            shadow_tls=(
                kw.pop("shadow_tls_cert"),
                kw.pop("shadow_tls_key"),
                kw.pop("shadow_tls_ca"),
            ),
        )
        return fn(**kw)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@click.command("serve")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--listen", default="127.0.0.1:10809", show_default=True, help="HOST:PORT (0: any free port)."
)
@click.option("--name", default=None, help="Export name [default: the file name of PATH].")
@click.option(
    "--size", default=None, help="Create PATH as a sparse file of this size if missing (64M, 1G)."
)
@click.option(
    "--block-size",
    default=4096,
    show_default=True,
    type=int,
    help="Tracking granularity and preferred NBD block size.",
)
@click.option("--read-only", is_flag=True, help="Refuse every write.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where tracking state persists; without it nothing is tracked.",
)
@click.option(
    "--save-interval",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds between bitmap checkpoints.",
)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--tls-verify-clients", is_flag=True, help="Require a client certificate signed by --tls-ca."
)
@click.option(
    "--checksums/--no-checksums",
    default=None,
    help="Keep a crc32c per block in STATE_DIR/checksums.map for `shadowblk verify` and "
    "scrub [default: on with --shadow, off otherwise: it costs a crc32c per written block].",
)
@click.option(
    "--control-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket through which the agent fences this primary (docs/switchover.md).",
)
@click.option(
    "--lease",
    type=click.FloatRange(0),
    default=None,
    help="Refuse writes after this many seconds unless the lease is renewed (--control-socket).",
)
@click.option(
    "--standby",
    is_flag=True,
    help="Wait for `go` on --control-socket before opening PATH (a shadow about to be promoted).",
)
@replication_options
def command(
    path: Path,
    listen: str,
    name: str | None,
    size: str | None,
    block_size: int,
    read_only: bool,
    state_dir: Path | None,
    save_interval: float,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    tls_verify_clients: bool,
    checksums: bool | None,
    control_socket: Path | None,
    lease: float | None,
    standby: bool,
    replication: Replication,
) -> None:
    """Export PATH (a regular file or block device) over NBD, tracking every write.

    With --shadow, every write is also shipped to the shadow servers (docs/nbd-server.md,
    "Replicated primary"). Prints `ready nbd://HOST:PORT/NAME` on stdout once it accepts
    clients. SIGTERM or SIGINT stop it cleanly: in-flight requests finish, data is flushed, the
    shadows are drained, tracking state is saved.
    """
    host, port = parse_listen(listen)
    nbytes = parse_size(size) if size is not None else None
    if block_size < 512 or block_size > (1 << 16) or block_size & (block_size - 1):
        raise click.BadParameter("must be a power of two in 512..65536", param_hint="--block-size")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if (tls_ca or tls_verify_clients) and tls_cert is None:
        raise click.UsageError("--tls-ca/--tls-verify-clients need --tls-cert and --tls-key")
    export_name = name if name is not None else path.name
    replication.check(export_name, state_dir, read_only)
    if checksums is None:
        checksums = bool(replication.shadows)
    if checksums and (state_dir is None or read_only):
        raise click.UsageError("--checksums needs --state-dir (and a writable export)")
    if (lease is not None or standby) and control_socket is None:
        raise click.UsageError("--lease and --standby need --control-socket")
    tracker: WriteTracker | None = None
    if standby and state_dir is not None and not read_only and nbytes is not None:
        try:  # its state's syncs now, not in the switchover's pause (agent/switch.py keeps it);
            # before the control socket answers: the agent waits for that
            tracker = WriteTracker(state_dir, nbytes, block_size, save_interval=save_interval)
        except (StateError, ValueError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
    fence = Fence(lease) if control_socket is not None else None
    control = ControlSocket(control_socket, fence) if control_socket and fence else None
    if standby and control is not None:
        _load_native_loop()
        log.info("standby: waiting for go on %s", control_socket)
        control.go.wait()
    try:
        tls = (
            server_context(tls_cert, tls_key, tls_ca, tls_verify_clients)
            if tls_cert and tls_key
            else None
        )
        slow = slowdisk.from_environment()  # test-only: a slow backing store
        backend = (
            slowdisk.open_slow(path, nbytes, read_only, slow)
            if slow
            else Backend.open(path, nbytes, read_only)
        )
    except (TLSConfigError, VolumeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        if tracker is not None and tracker.bitmap.size != backend.size:
            raise ValueError(f"{path}: {backend.size} bytes, not the {nbytes} of --size")
        if tracker is None and state_dir is not None and not read_only:
            tracker = WriteTracker(state_dir, backend.size, block_size, save_interval=save_interval)
        export = Export(export_name, backend, preferred_block=block_size)
        # the checksum map opens (its header's sync; a rebuild if it is not trusted) on a
        # thread while the replication state is read: both before the ready line, neither
        # depends on the other (a promoted standby's start is in a switchover's pause)
        pool = ThreadPoolExecutor(1, thread_name_prefix="checksum-map")
        opening = (
            pool.submit(ChecksumObserver, state_dir, backend, block_size)
            if checksums and state_dir is not None
            else None
        )
        pool.shutdown(wait=False)
        try:
            observer = replication.observer(export_name, backend, block_size, state_dir)
        finally:
            crc_observer = None if opening is None else opening.result()
        if crc_observer is not None and observer is not None:
            crc_observer.epoch = lambda: observer.replicator.last_cut

        def on_quiet() -> None:
            if scrubs is not None:  # first: a running scrub stops before what it uses closes
                scrubs.close()
            try:
                if observer is not None:  # a fenced primary shipped its last epoch already
                    fenced = fence is not None and fence.fenced_for_good
                    observer.close(0.0 if fenced else replication.drain_timeout)
            finally:
                if crc_observer is not None:
                    crc_observer.close()

        server = NBDServer(
            export, host, port, tls=tls, tracker=tracker, on_quiet=on_quiet, native=not slow
        )
    except (StateError, PrimaryStateError, MapBusyError, ValueError, OSError) as exc:
        backend.close()
        raise click.ClickException(str(exc)) from None
    if observer is not None and tracker is not None:
        observer.url = server.url
        observer.replicator.writers = tracker.ordering
        tracker.observers.append(observer)
        observer.start()
    if crc_observer is not None and tracker is not None:
        tracker.observers.append(crc_observer)  # after the replicator: a fenced write is not
        # made, so it must not reach the map either
    if fence is not None and tracker is not None:
        fence.tracker, fence.replication = tracker, observer
        tracker.observers.insert(0, fence)  # first: a refused write reaches no shadow
    scrubs = (  # STATE_DIR/scrub.sock: `shadowblk scrub --state-dir` (docs/integrity.md)
        open_endpoint(
            state_dir,
            LiveVolume(export_name, tracker, backend, crc_observer.map),
            replication.key,
            replication.tls,
        )
        if crc_observer is not None and tracker is not None and state_dir is not None
        else None
    )
    server.install_signal_handlers()
    click.echo(f"ready {server.url}")
    sys.stdout.flush()
    log.info("serving %s (%d bytes) at %s", path, backend.size, server.url)
    server.serve_forever()
