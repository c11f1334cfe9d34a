"""Which blocks of a frame's pieces are all zeros, in C with the GIL released.

The primary sends all-zero blocks as ZERO ranges, without data. A block that is not all zeros
is nearly always told by its first bytes, so the scan reads little more than a word per block
of real data; only zero blocks (and ones that start with zeros) are read in full.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.string cimport memcmp

import numpy as np


cdef bint all_zero(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    if n == 0:
        return True
    if p[0] != 0:
        return False
    return memcmp(p, p + 1, n - 1) == 0


def zero_mask(pieces, Py_ssize_t block_size):
    """A bool per block of PIECES (buffers of whole blocks, in order): True where the block is
    all zeros. ValueError for a piece that is not whole blocks."""
    if block_size <= 0:
        raise ValueError(f"block_size {block_size} must be positive")
    cdef Py_buffer view
    cdef Py_ssize_t total = 0, at = 0, k, nblocks
    cdef const unsigned char *base
    for piece in pieces:
        PyObject_GetBuffer(piece, &view, PyBUF_SIMPLE)
        nblocks = view.len // block_size
        bad = view.len % block_size
        PyBuffer_Release(&view)
        if bad:
            raise ValueError(f"a piece of {len(piece)} bytes is not whole blocks of {block_size}")
        total += nblocks
    result = np.zeros(total, dtype=np.bool_)
    cdef unsigned char[::1] out = result.view(np.uint8)
    for piece in pieces:
        PyObject_GetBuffer(piece, &view, PyBUF_SIMPLE)
        try:
            nblocks = view.len // block_size
            base = <const unsigned char *>view.buf
            with nogil:
                for k in range(nblocks):
                    out[at + k] = all_zero(base + k * block_size, block_size)
            at += nblocks
        finally:
            PyBuffer_Release(&view)
    return result
