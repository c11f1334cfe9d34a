"""A `shadowblk serve` started before anyone knows which volume it will serve.

    python -m shadowblk.agent.zygote SOCKET

Python and the serve command's imports (most of a `serve` start on a loaded machine) are loaded
at once; then it waits on the Unix socket SOCKET for one JSON line `{"args": [...]}` (the
`shadowblk` arguments: `serve PATH ... --standby`), answers `{"ok": true}` and runs that command
in this process. The agent keeps one ready while it hosts shadows, so that a promotion's
standby `serve` (docs/switchover.md), even an emergency's, does not wait for a process start.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path

import shadowblk.cli.serve  # noqa: F401  (loaded now: the point of a zygote)
from shadowblk.cli.main import cli

MAX_LINE = 1 << 16


def wait_for_args(path: Path) -> list[str]:
    """Listen on PATH until one client sends a valid command line; answer it; its arguments."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(1)
        try:
            while True:
                conn, _ = listener.accept()
                try:
                    with conn, conn.makefile("rwb") as stream:
                        try:
                            args = json.loads(stream.readline(MAX_LINE))["args"]
                            if not isinstance(args, list) or not all(
                                isinstance(a, str) for a in args
                            ):
                                raise TypeError("args must be a list of strings")
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
    cli(args=wait_for_args(Path(argv[0])), prog_name="shadowblk")


if __name__ == "__main__":
    main(sys.argv[1:])
