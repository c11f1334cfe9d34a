"""Keep freed buffers in the process instead of giving them back to the kernel at once.

A shadow decompresses and receives frames of up to 1 MiB into new buffers, holds an epoch's
worth of them, and frees them at its commit. With glibc's defaults each such buffer is mapped
fresh (or its pages handed back when the heap's top is trimmed) and every one of its pages is
faulted in and zeroed by the kernel again: about a tenth of a shadow's CPU under 4k random
writes. Raising the mmap and trim thresholds lets the heap reuse those pages; the price is a
resident size that stays at its peak (an epoch held in memory: HOLD_BYTES at most).
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below this come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory at the heap's top kept for reuse


def keep_freed_buffers() -> bool:
    """Tune glibc's malloc for reuse of big buffers; False where there is no glibc mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    done = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and done
    if not done:
        log.debug("mallopt refused the thresholds: buffers are mapped afresh")
    return done
