"""`shadowblk doctor`: is this host ready to run shadowblk? Checks the fast path and the tools."""

import importlib
import platform
import shutil
from typing import Any

import click

from shadowblk import __version__
from shadowblk.cli.output import emit, json_option

NATIVE_MODULES = ("bitmap", "blockcrc", "mutex", "nbdloop")
TOOLS = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdfuse": "nbdfuse",
    "nbdkit": "nbdkit",
    "fio": "fio",
    "smartctl": "smartmontools",
}


def _native_status() -> dict[str, str]:
    status = {}
    for name in NATIVE_MODULES:
        try:
            importlib.import_module(f"shadowblk._native.{name}")
            status[name] = "built"
        except ImportError as exc:
            status[name] = f"missing ({exc})"
    return status


def _crc_status() -> str:
    try:
        from shadowblk.integrity.blockcrc import hardware_crc32c
    except ImportError as exc:
        return f"unavailable ({exc})"
    return "hardware" if hardware_crc32c() else "software"


def collect() -> dict[str, Any]:
    """Everything doctor checks, as data."""
    tools = {
        tool: {"path": shutil.which(tool), "package": package} for tool, package in TOOLS.items()
    }
    native = _native_status()
    ok = all(v == "built" for v in native.values())
    return {
        "version": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "native": native,
        "crc32c": _crc_status(),
        "tools": tools,
        "ok": ok,
    }


def _human(report: dict[str, Any]) -> str:
    lines = [f"shadowblk {report['version']} on Python {report['python']} ({report['machine']})"]
    for name, state in report["native"].items():
        lines.append(f"  fast path {name:<10} {state}")
    lines.append(f"  crc32c               {report['crc32c']}")
    for tool, info in report["tools"].items():
        where = info["path"] or f"not found (apt-get install {info['package']})"
        lines.append(f"  tool {tool:<15} {where}")
    lines.append("ready" if report["ok"] else "NOT READY: rebuild with `make build`")
    return "\n".join(lines)


@click.command("doctor")
@json_option
def command(as_json: bool) -> None:
    """Check that the fast path is built and the tools shadowblk works with are installed.

    Exits 1 when the fast path is missing (shadowblk would not run at speed, or at all).
    """
    report = collect()
    emit(report, as_json, _human)
    if not report["ok"]:
        raise SystemExit(1)
