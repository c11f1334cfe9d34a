"""shadowblk: block-volume shadowing with predictive, pre-emptive switchover."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shadowblk")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
