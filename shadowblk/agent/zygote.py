"""A `shadowblk serve` started before anyone knows which volume it will serve.

    python -m shadowblk.agent.zygote SOCKET

Python and the serve command's imports (most of a `serve` start on a loaded machine) are loaded
at once; then it waits on the Unix socket SOCKET for one JSON line `{"args": [...]}` (the
`shadowblk` arguments: `serve PATH ...`, `--standby` for a planned promotion's), answers
`{"ok": true}` and runs that command in this process. The agent keeps one ready while it hosts
shadows, so that a promotion's `serve` (docs/switchover.md), even an emergency's, does not wait
for a process start.

It runs as the agent does (root): only `serve` is taken, and SOCKET must be in a folder only
this user can enter (the agent's private folder, roles.private_dir), created 0600 from the start.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
from pathlib import Path

import shadowblk.cli.serve  # noqa: F401  (loaded now: the point of a zygote)
from shadowblk.cli.main import cli

MAX_LINE = 1 << 16
COMMAND = "serve"  # the only command a zygote becomes


def check_private(folder: Path) -> None:
    """ValueError unless FOLDER is this user's and closed to others: whoever can reach the
    socket has a command run as this user."""
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ValueError(f"{folder} must be a folder of this user's closed to others (0700)")


def parse(line: bytes) -> list[str]:
    """The `serve` arguments in one request line (ValueError, KeyError, TypeError if not)."""
    args = json.loads(line)["args"]
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise TypeError("args must be a list of strings")
    if not args or args[0] != COMMAND:
        raise ValueError(f"only `{COMMAND}` is run here")
    return args


def wait_for_args(path: Path) -> list[str]:
    """Listen on PATH until one client sends a valid command line; answer it; its arguments."""
    check_private(path.parent)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        umask = os.umask(0o177)  # the socket is 0600 from the start
        try:
            listener.bind(str(path))
        finally:
            os.umask(umask)
        listener.listen(1)
        try:
            while True:
                conn, _ = listener.accept()
                try:
                    with conn, conn.makefile("rwb") as stream:
                        try:
                            args = parse(stream.readline(MAX_LINE))
                        except (ValueError, KeyError, TypeError) as exc:
                            refusal = {"ok": False, "error": f"bad command: {exc}"}
                            stream.write(json.dumps(refusal).encode() + b"\n")
                            continue
                        stream.write(b'{"ok": true}\n')
                    return args
                except OSError:  # a client gone before the answer: it did not hand anything over
                    continue
        finally:
            path.unlink(missing_ok=True)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m shadowblk.agent.zygote SOCKET")
    try:
        args = wait_for_args(Path(argv[0]))
    except (ValueError, OSError) as err:
        sys.exit(f"zygote: {err}")
    cli(args=args, prog_name="shadowblk")


if __name__ == "__main__":
    main(sys.argv[1:])
