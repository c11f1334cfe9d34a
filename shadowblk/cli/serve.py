"""`shadowblk serve`: export a volume over NBD with in-band write tracking."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click

from shadowblk.nbd.backend import Backend, VolumeError
from shadowblk.nbd.handshake import Export
from shadowblk.nbd.server import NBDServer
from shadowblk.nbd.tls import TLSConfigError, server_context
from shadowblk.tracking.tracker import StateError, WriteTracker

log = logging.getLogger(__name__)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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
) -> None:
    """Export PATH (a regular file or block device) over NBD, tracking every write.

    Prints `ready nbd://HOST:PORT/NAME` on stdout once it accepts clients. SIGTERM or SIGINT
    stop it cleanly: in-flight requests finish, data is flushed, tracking state is saved.
    """
    host, port = parse_listen(listen)
    nbytes = parse_size(size) if size is not None else None
    if block_size < 512 or block_size > (1 << 16) or block_size & (block_size - 1):
        raise click.BadParameter("must be a power of two in 512..65536", param_hint="--block-size")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if (tls_ca or tls_verify_clients) and tls_cert is None:
        raise click.UsageError("--tls-ca/--tls-verify-clients need --tls-cert and --tls-key")
    try:
        tls = (
            server_context(tls_cert, tls_key, tls_ca, tls_verify_clients)
            if tls_cert and tls_key
            else None
        )
        backend = Backend.open(path, nbytes, read_only)
    except (TLSConfigError, VolumeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        tracker = (
            WriteTracker(state_dir, backend.size, block_size, save_interval=save_interval)
            if state_dir is not None and not read_only
            else None
        )
        export = Export(
            name if name is not None else path.name, backend, preferred_block=block_size
        )
        server = NBDServer(export, host, port, tls=tls, tracker=tracker)
    except (StateError, ValueError, OSError) as exc:
        backend.close()
        raise click.ClickException(str(exc)) from None
    server.install_signal_handlers()
    click.echo(f"ready {server.url}")
    sys.stdout.flush()
    log.info("serving %s (%d bytes) at %s", path, backend.size, server.url)
    server.serve_forever()
