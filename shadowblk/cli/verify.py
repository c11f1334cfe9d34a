"""`shadowblk verify`: compare a live replicated primary with one of its shadows by checksum map
and hash tree, while writes continue (docs/integrity.md, "Verify"), over the network (the
shadow's verify port) or from the shadow's data folder on this host. Exit code: 0 clean, 1
discrepancies found (recorded in STATE_DIR/discrepancies.jsonl), 2 the two could not be
compared (no map, shadow not in sync, verify port unreachable, ...)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from shadowblk.cli.output import emit, json_option
from shadowblk.cli.shadow import parse_listen
from shadowblk.delta.auth import AuthConfigError, client_tls_context, load_key
from shadowblk.integrity.discrepancies import DiscrepancyLog
from shadowblk.integrity.verify import (
    LocalShadow,
    NotComparable,
    RemoteShadow,
    ShadowSource,
    Verifier,
    VerifyReport,
    recorded_shadow,
)

NOT_COMPARED = 2


def _render(data: dict[str, Any]) -> str:
    lines = []
    for i, rep in enumerate(data["compares"]):
        head = f"compare {i + 1}: " if len(data["compares"]) > 1 else ""
        if "error" in rep:
            lines.append(f"{head}not compared: {rep['error']}")
            continue
        lines.append(
            f"{head}{rep['volume']} vs shadow {rep['shadow']}: {rep['rounds']} round(s), "
            f"{rep['bytes_exchanged']} bytes exchanged"
            + (f" ({rep['wire_bytes']} on the wire)" if rep["wire_bytes"] else "")
            + f", {rep['in_flight']} block(s) in flight "
            f"({rep['deferred']} differing, {rep['resolved']} rechecked equal), "
            f"{len(rep['differing'])} differing"
            + (f", {len(rep['still_in_flight'])} still in flight" if rep["still_in_flight"] else "")
        )
        for block in rep["differing_blocks"]:
            lines.append(f"  block {block} (offset {block * rep['block_size']}): maps differ")
    lines.append({0: "clean", 1: "DISCREPANCIES", 2: "not compared"}[data["exit_code"]])
    return "\n".join(lines)


@click.command("verify")
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The primary's state folder (`serve --state-dir`, with --checksums).",
)
@click.option(
    "--shadow",
    default=None,
    help="HOST:PORT of the shadow to compare with, as given to `serve --shadow` "
    "[default: the only one].",
)
@click.option(
    "--shadow-verify",
    default=None,
    metavar="HOST:PORT",
    help="The shadow's verify port (`shadow --verify-listen`) "
    "[default: the --shadow host, its port + 1].",
)
@click.option(
    "--shadow-data-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Read the shadow's map from its --data-dir on this host instead of the network.",
)
@click.option(
    "--hmac-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The shared key of the delta streams (the verify port uses the same).",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="This side's TLS certificate (PEM), with --tls-key and --tls-ca.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The private key of --tls-cert (PEM).",
)
@click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TLS 1.3 to the verify port: this side's certificate and the CA of the shadows'.",
)
@click.option(
    "--recheck-timeout",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds to wait for blocks in flight to settle before calling them still in flight.",
)
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(1), help="Compares.")
@click.option("--interval", default=0.0, type=float, help="Seconds between repeated compares.")
@click.option("--server", default=None, help="Server name for the discrepancy log.")
@json_option
def command(
    state_dir: Path,
    shadow: str | None,
    shadow_verify: str | None,
    shadow_data_dir: Path | None,
    hmac_key_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    recheck_timeout: float,
    repeat: int,
    interval: float,
    server: str | None,
    as_json: bool,
) -> None:
    """Compare the primary in STATE_DIR with a shadow, block by block checksum, while the
    volume is in use: blocks written but not yet acknowledged by the shadow are deferred and
    rechecked once acknowledged, never reported as discrepancies.

    The shadow answers at its verify port (`shadowblk shadow --verify-listen`), authenticated
    like the delta stream (--hmac-key-file and/or the TLS options); or, with --shadow-data-dir,
    its map is read on this host."""
    log = DiscrepancyLog.in_state_dir(state_dir)
    compares: list[dict[str, Any]] = []
    code = 0
    source: ShadowSource | None = None
    try:
        if shadow_data_dir is not None:
            source = LocalShadow(shadow_data_dir)
        else:
            source = _remote(
                shadow or recorded_shadow(state_dir),
                shadow_verify,
                hmac_key_file,
                (tls_cert, tls_key, tls_ca),
            )
        verifier = Verifier(state_dir, source, shadow, server)
    except NotComparable as exc:
        compares.append({"error": str(exc)})
        code = NOT_COMPARED
    else:
        for i in range(repeat):
            if i and interval:
                time.sleep(interval)
            try:
                report: VerifyReport = verifier.verify(recheck_timeout, log)
            except NotComparable as exc:
                compares.append({"error": str(exc)})
                code = max(code, NOT_COMPARED) if code != 1 else code
                continue
            compares.append(report.as_dict())
            if report.differing:
                code = 1
    if source is not None:
        source.close()
    data = {
        "exit_code": code,
        "compares": compares,
        "false_alarm_rule": "blocks in flight are deferred and rechecked, never reported",
    }
    emit(data, as_json, _render)
    raise SystemExit(code)


def _remote(
    shadow: str,
    verify_address: str | None,
    key_file: Path | None,
    tls_files: tuple[Path | None, Path | None, Path | None],
) -> RemoteShadow:
    """The shadow's verify port, with the delta stream's credentials."""
    if verify_address is None:
        host, port = parse_listen(shadow)
        port += 1
    else:
        host, port = parse_listen(verify_address)
    if any(tls_files) and not all(tls_files):
        raise click.UsageError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
    if key_file is None and not all(tls_files):
        raise click.UsageError(
            "the verify port is authenticated: give --hmac-key-file or the TLS options "
            "(or --shadow-data-dir to read the shadow's map on this host)"
        )
    cert, key, ca = tls_files
    try:
        hmac_key = load_key(key_file) if key_file else None
        tls = client_tls_context(cert, key, ca) if cert and key and ca else None
    except AuthConfigError as exc:
        raise click.UsageError(str(exc)) from None
    return RemoteShadow(host, port, hmac_key, tls)
