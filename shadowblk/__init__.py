"""shadowblk: block-volume shadowing with predictive, pre-emptive switchover."""


def __getattr__(name: str) -> str:
    """`__version__`, read on first use: importlib.metadata costs about 0.2 s at every start
    (many seconds for each Python the kernel lab's guest starts over 9p)."""
    if name != "__version__":
        raise AttributeError(f"module 'shadowblk' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shadowblk")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"
