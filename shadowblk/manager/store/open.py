"""Choosing the store engine from a URL, so every role takes one `--store` option."""

from urllib.parse import urlsplit

from shadowblk.manager.store.interface import Store, StoreError


def open_store(url: str) -> Store:
    """`sqlite:PATH` (PATH may be relative) or `etcd://HOST:PORT[/PREFIX]`."""
    # engines are imported on use: the etcd client pulls in requests and futurist
    if url.startswith("sqlite:"):
        from shadowblk.manager.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:").removeprefix("//"))
    if url.startswith(("etcd://", "http://")):
        from shadowblk.manager.store.etcd import EtcdStore

        path = urlsplit(url).path.strip("/")
        prefix = f"/{path}/" if path else "/shadowblk/"
        return EtcdStore(url, prefix=prefix)
    raise StoreError(f"unknown store {url!r}: use sqlite:PATH or etcd://HOST:PORT[/PREFIX]")
