"""The manager's metadata store: one small interface (interface.Store), two engines.

`open_store("sqlite:PATH")` is the embedded default; `open_store("etcd://HOST:PORT")` the
distributed one for several managers. See docs/store.md.
"""

from shadowblk.manager.store.interface import (
    DuplicateOrder,
    GenerationConflict,
    NotFound,
    StaleFence,
    Store,
    StoreError,
)
from shadowblk.manager.store.open import open_store

__all__ = [
    "DuplicateOrder",
    "GenerationConflict",
    "NotFound",
    "StaleFence",
    "Store",
    "StoreError",
    "open_store",
]
