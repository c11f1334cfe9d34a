"""What every command that talks to a manager shares: --manager, the token, and turning the
manager's refusals into one clear line and a non-zero exit."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from shadowblk.manager.client import Client, ManagerError

DEFAULT_TOKEN_FILE = Path("/var/lib/shadowblk/manager/token")  # a manager's generated token


def _token(token_file: Path | None) -> str | None:
    """--token-file, else $SHADOWBLK_TOKEN, else the local manager's generated token if any."""
    if token_file is not None:
        try:
            return token_file.read_text().strip()
        except OSError as err:
            raise click.BadParameter(
                f"{token_file}: {err.strerror}", param_hint="--token-file"
            ) from None
    if os.environ.get("SHADOWBLK_TOKEN"):
        return os.environ["SHADOWBLK_TOKEN"].strip()
    try:
        return DEFAULT_TOKEN_FILE.read_text().strip()
    except OSError:
        return None  # reads need no token; a change will say it needs one


def manager_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --manager (as `manager_url`) and --token-file to a command."""
    fn = click.option(
        "--token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="The bearer token for changes [else env SHADOWBLK_TOKEN, else "
        f"{DEFAULT_TOKEN_FILE} if readable].",
    )(fn)
    return click.option(
        "--manager",
        "manager_url",
        envvar="SHADOWBLK_MANAGER",
        default="http://127.0.0.1:7600",
        show_default=True,
        help="The manager's URL, or several comma-separated (any of the fleet's managers) "
        "[env SHADOWBLK_MANAGER].",
    )(fn)


def make_client(manager_url: str, token_file: Path | None) -> Client:
    """The client of --manager with the token (ManagerError: a URL that is not one)."""
    return Client(manager_url, _token(token_file))


def with_client(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --manager and --token-file to a command and pass it a Client as `client`."""

    @manager_options
    @wraps(fn)
    def wrapper(manager_url: str, token_file: Path | None, **kw: Any) -> Any:
        try:
            return fn(client=make_client(manager_url, token_file), **kw)
        except ManagerError as err:
            raise click.ClickException(explain(err)) from None

    return wrapper


def explain(err: ManagerError) -> str:
    """The manager's message, with a hint where the fix is on this side."""
    if err.status == 401:
        return f"{err.error}: give --token-file or set SHADOWBLK_TOKEN"
    return err.error
