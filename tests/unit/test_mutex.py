"""The native Mutex the tracker shares with the GIL-free NBD loop: a plain lock from Python,
waited for with the GIL released (a Python thread waiting must not stall the holder)."""

from __future__ import annotations

import threading

from shadowblk._native.mutex import Mutex


def test_excludes_and_lets_a_waiting_thread_in_after_release() -> None:
    lock = Mutex()
    order: list[str] = []

    def waiter() -> None:
        with lock:
            order.append("waiter")

    lock.acquire()
    thread = threading.Thread(target=waiter)
    thread.start()
    # the waiter blocks inside acquire() without the GIL, so this thread runs on
    order.append("holder")
    lock.release()
    thread.join()
    assert order == ["holder", "waiter"]
