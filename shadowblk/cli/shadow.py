"""`shadowblk shadow`: a shadow server that receives delta streams and applies them to DIR."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click

from shadowblk.delta.auth import AuthConfigError, load_key, server_tls_context
from shadowblk.delta.server import ShadowServer
from shadowblk.delta.volume_state import VOLUME_ID
from shadowblk.integrity import tree_service

log = logging.getLogger(__name__)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def parse_volume_paths(values: tuple[str, ...]) -> dict[str, Path]:
    devices = {}
    for value in values:
        vid, sep, path = value.partition("=")
        if not sep or not VOLUME_ID.match(vid) or not path:
            raise click.BadParameter(f"{value!r} is not VOLUME=PATH", param_hint="--volume-path")
        devices[vid] = Path(path)
    return devices


def parse_holds(values: tuple[str, ...]) -> dict[str, float]:
    holds = {}
    for value in values:
        vid, sep, seconds = value.partition("=")
        try:
            holds[vid] = float(seconds)
        except ValueError:
            sep = ""
        if not sep or not VOLUME_ID.match(vid):
            raise click.BadParameter(f"{value!r} is not VOLUME=SECONDS", param_hint="--hold")
    return holds


async def _serve(
    server: ShadowServer,
    host: str,
    port: int,
    verify: tuple[str, int] | None,
    control_socket: Path | None = None,
) -> None:
    verifier = None
    control = await server.serve_control(control_socket) if control_socket else None
    if verify is not None:  # bound first: `ready` means both ports answer
        service = tree_service.TreeService(server.data_dir, server.key, server.tls, server.devices)
        verifier = await tree_service.start(service, *verify)
        url = f"verify://{verify[0]}:{verifier.sockets[0].getsockname()[1]}"
        log.info("verify port: %s", url)
        print(f"verify {url}", flush=True)  # before `ready`: the port bound for port 0
    listener = await asyncio.start_server(server.handle, host, port, ssl=server.tls)
    bound = listener.sockets[0].getsockname()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready shadow://{host}:{bound[1]}", flush=True)
    await stop.wait()
    log.warning("stopping: no new streams; open streams end at an epoch boundary")
    listener.close()
    if verifier is not None:
        verifier.close()
    if control is not None:
        control.close()
    await server.close()
    await listener.wait_closed()


@click.command("shadow")
@click.option("--listen", required=True, help="HOST:PORT to accept delta streams on (port 0: any).")
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the shadow volumes: <volume>.img, <volume>.state, <volume>.journal.",
)
@click.option(
    "--hmac-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Shared secret; every frame carries a tag (BLAKE2b or Poly1305) keyed by it.",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA that signs the primaries' client certificates (TLS 1.3, client cert required).",
)
@click.option(
    "--volume-path",
    "volume_paths",
    multiple=True,
    metavar="VOLUME=PATH",
    help="Keep VOLUME's image on PATH (a block device or an existing file of the volume's size)"
    " instead of DIR/VOLUME.img. Repeatable.",
)
@click.option(
    "--verify-listen",
    default=None,
    metavar="HOST:PORT",
    help="Also answer `shadowblk verify` (hash-tree compare of the volumes' checksum maps) "
    "on HOST:PORT, with the same authentication; by convention the --listen port + 1 "
    "(port 0: any free port, printed as `verify verify://HOST:PORT`).",
)
@click.option(
    "--control-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket through which the agent hands one volume over at a switchover "
    "(release, adopt) while the others keep streaming (docs/switchover.md).",
)
@click.option(
    "--hold",
    "holds",
    multiple=True,
    metavar="VOLUME=SECONDS",
    help="Refuse streams for VOLUME for SECONDS from the start (it changes role). Repeatable.",
)
def command(
    listen: str,
    data_dir: Path,
    hmac_key_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    volume_paths: tuple[str, ...],
    verify_listen: str | None,
    control_socket: Path | None,
    holds: tuple[str, ...],
) -> None:
    """Receive delta streams from primaries and keep DIR/<volume>.img at an exact past state.

    Needs an authentication: --hmac-key-file, or --tls-cert/--tls-key/--tls-ca, or both.
    Prints `ready shadow://HOST:PORT` once listening (after `verify verify://HOST:PORT` with
    --verify-listen); SIGTERM stops it cleanly.
    """
    host, port = parse_listen(listen)
    verify = parse_listen(verify_listen) if verify_listen else None
    held = parse_holds(holds)
    tls_opts = (tls_cert, tls_key, tls_ca)
    if any(tls_opts) and not all(tls_opts):
        raise click.UsageError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
    if hmac_key_file is None and not all(tls_opts):
        raise click.UsageError("give --hmac-key-file or the TLS options: streams must be authentic")
    try:
        key = load_key(hmac_key_file) if hmac_key_file else None
        tls = server_tls_context(tls_cert, tls_key, tls_ca) if all(tls_opts) else None  # type: ignore[arg-type]
    except AuthConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    server = ShadowServer(data_dir, key, tls, parse_volume_paths(volume_paths), held)
    try:
        asyncio.run(_serve(server, host, port, verify, control_socket))
    except OSError as exc:
        click.echo(f"shadow: cannot listen: {exc}", err=True)
        sys.exit(1)
