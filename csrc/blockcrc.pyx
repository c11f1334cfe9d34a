"""crc32c of every block of a buffer, in C with the GIL released (csrc/lib/crc32c_blocks.h)."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint32_t
from libc.stdlib cimport free, malloc

import numpy as np

cdef extern from "crc32c_blocks.h" nogil:
    ctypedef struct crc32c_shift_t:
        pass
    void crc32c_init()
    int crc32c_hw_available()
    size_t crc32c_part(size_t n)
    void crc32c_shift_make(crc32c_shift_t *op, size_t nbytes)
    void crc32c_blocks(const unsigned char *buf, size_t length, size_t block, uint32_t *out,
                       int hw, const crc32c_shift_t *full, crc32c_shift_t *scratch)

crc32c_init()
cdef bint HARDWARE = crc32c_hw_available()
cdef dict _shifts = {}   # block size -> its shift tables: building them costs ~20 us


cdef bytes shift_for(Py_ssize_t block_size, int hw):
    """The tables that feed crc32c_part(block_size) zero bytes, made once per block size (none
    for the table code, HW false); ValueError for a block size that is not positive."""
    if block_size <= 0:
        raise ValueError(f"block_size {block_size} must be positive")
    if not hw:
        return b""
    cdef bytes tables = _shifts.get(block_size)
    if tables is None:
        tables = bytes(sizeof(crc32c_shift_t))
        if crc32c_part(block_size):
            crc32c_shift_make(<crc32c_shift_t *><char *>tables, crc32c_part(block_size))
        if len(_shifts) < 64:
            _shifts[block_size] = tables
    return tables


def hardware_crc32c() -> bool:
    """Whether this CPU computes crc32c in hardware (SSE4.2), found at run time."""
    return HARDWARE


def block_crc32c(buf, Py_ssize_t block_size=4096, bint hardware=True):
    """The crc32c of each block_size-byte block of a contiguous buffer (the last one may be
    short) as a uint32 array. hardware=False forces the table code, for tests and benchmarks."""
    cdef Py_buffer view
    cdef crc32c_shift_t scratch
    cdef uint32_t[::1] out
    cdef Py_ssize_t nblocks
    cdef int hw = hardware and HARDWARE
    cdef bytes full = shift_for(block_size, hw)
    cdef const char *full_ptr = full
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        nblocks = (view.len + block_size - 1) // block_size
        result = np.empty(nblocks, dtype=np.uint32)
        if nblocks == 0:
            return result
        out = result
        with nogil:
            crc32c_blocks(<const unsigned char *>view.buf, view.len, block_size, &out[0], hw,
                          <const crc32c_shift_t *>full_ptr, &scratch)
        return result
    finally:
        PyBuffer_Release(&view)


def store_crc32c(uint32_t[::1] entries not None, Py_ssize_t block_size, writes,
                 Py_ssize_t start=0):
    """Checksum whole-block WRITES, a sequence of (offset, buffer), from index START on
    straight into ENTRIES (a map's uint32 array, one crc per block): no Python object per
    block. Stops at the first write that is not whole blocks inside the map and returns its
    index (len(writes) when every write was stored), for the caller's slower path."""
    cdef Py_buffer view
    cdef crc32c_shift_t scratch
    cdef Py_ssize_t i, n = len(writes)
    cdef Py_ssize_t nblocks = entries.shape[0]
    cdef unsigned long long offset
    cdef int hw = HARDWARE
    cdef bytes full = shift_for(block_size, hw)
    cdef const char *full_ptr = full
    for i in range(start, n):
        item = writes[i]
        offset = item[0]
        PyObject_GetBuffer(item[1], &view, PyBUF_SIMPLE)
        try:
            if (view.len == 0 or offset % block_size or view.len % block_size
                    or offset // block_size + view.len // block_size > <unsigned long long>nblocks):
                return i
            crc32c_blocks(<const unsigned char *>view.buf, view.len, block_size,
                          &entries[offset // block_size], hw, <const crc32c_shift_t *>full_ptr,
                          &scratch)
        finally:
            PyBuffer_Release(&view)
    return n


def first_bad_block(buf, Py_ssize_t block_size, expected):
    """The index of the first whole block of BUF whose crc32c differs from its entry in
    EXPECTED (big-endian uint32, one per block), or -1 when all match: a frame's blocks checked
    in one call, with the GIL released. ValueError if EXPECTED has not one entry per block."""
    cdef Py_buffer view, want
    cdef crc32c_shift_t scratch
    cdef Py_ssize_t i, nblocks, bad = -1
    cdef const unsigned char *w
    cdef uint32_t *crcs
    cdef int hw = HARDWARE
    cdef bytes full = shift_for(block_size, hw)
    cdef const char *full_ptr = full
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(expected, &want, PyBUF_SIMPLE)
        try:
            if view.len % block_size or want.len != 4 * (view.len // block_size):
                raise ValueError(
                    f"{view.len} bytes in blocks of {block_size} against {want.len // 4} crcs")
            nblocks = view.len // block_size
            if nblocks == 0:
                return -1
            crcs = <uint32_t *>malloc(nblocks * sizeof(uint32_t))
            if crcs == NULL:
                raise MemoryError()
            w = <const unsigned char *>want.buf
            with nogil:
                crc32c_blocks(<const unsigned char *>view.buf, view.len, block_size, crcs, hw,
                              <const crc32c_shift_t *>full_ptr, &scratch)
                for i in range(nblocks):
                    if crcs[i] != ((<uint32_t>w[4 * i] << 24) | (<uint32_t>w[4 * i + 1] << 16)
                                   | (<uint32_t>w[4 * i + 2] << 8) | w[4 * i + 3]):
                        bad = i
                        break
            free(crcs)
            return bad
        finally:
            PyBuffer_Release(&want)
    finally:
        PyBuffer_Release(&view)
