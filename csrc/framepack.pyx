"""An EXTENT frame's payload made in one native pass over its pieces (docs/protocol.md, EXTENT).

A frame of a random writer's epoch holds 256 single blocks: in Python, finding its zero blocks,
merging its extents, checksumming and joining its blocks cost several microseconds a block,
more than zstd. Here the all-zero blocks are found (a non-zero block is told by its first byte),
the others copied once behind room for the head, and the head (count, extent list, crcs) written
in front of them, with the GIL released while the bytes are scanned, copied and checksummed.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

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
cdef int HARDWARE = crc32c_hw_available()
cdef dict _shifts = {}  # block size -> its shift tables (made once: ~20 us)

cdef enum:
    COUNT_SIZE = 4  # the extent count, big-endian uint32
    ENTRY_SIZE = 12  # an extent: offset (big-endian uint64), length (big-endian uint32)
    CRC_SIZE = 4


cdef bytes shift_for(Py_ssize_t block_size):
    if not HARDWARE:
        return b""
    cdef bytes tables = _shifts.get(block_size)
    if tables is None:
        tables = bytes(sizeof(crc32c_shift_t))
        if crc32c_part(block_size):
            crc32c_shift_make(<crc32c_shift_t *><char *>tables, crc32c_part(block_size))
        if len(_shifts) < 64:
            _shifts[block_size] = tables
    return tables


cdef inline bint all_zero(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    if p[0] != 0:
        return False
    return memcmp(p, p + 1, n - 1) == 0


cdef inline void put_be32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = v >> 16
    p[2] = v >> 8
    p[3] = v


cdef inline void put_be64(unsigned char *p, uint64_t v) noexcept nogil:
    put_be32(p, <uint32_t>(v >> 32))
    put_be32(p + 4, <uint32_t>v)


def pack_frame(list pieces not None, Py_ssize_t block_size):
    """PIECES: sorted, disjoint (first block, end block, data) of whole blocks, at most one
    frame's worth. Returns (payload, head_len, offset, length, zeros): PAYLOAD is the EXTENT
    head (count, extent list, a crc32c per block) followed by the non-zero blocks' data, or
    None when every block is zero; OFFSET and LENGTH the frame header's (first extent's offset,
    data bytes); ZEROS the all-zero blocks as (offset, length) byte ranges, adjacent ones
    merged. ValueError for a piece whose data is not its blocks."""
    if block_size <= 0:
        raise ValueError(f"block_size {block_size} must be positive")
    cdef Py_ssize_t npieces = len(pieces), i, k, nblocks = 0, at, nz = 0, nextents = 0
    cdef Py_ssize_t head_len, done = 0
    cdef uint64_t start, end, block, last_nz = 0, total_len = 0, zero_start = 0, zero_len = 0
    cdef bint have_nz = False
    cdef Py_buffer *views = <Py_buffer *>malloc(max(npieces, 1) * sizeof(Py_buffer))
    cdef uint64_t *firsts = <uint64_t *>malloc(max(npieces, 1) * sizeof(uint64_t))
    cdef unsigned char *zero = NULL
    cdef uint64_t *ext_off = NULL
    cdef uint32_t *ext_len = NULL
    cdef uint32_t *crcs = NULL
    cdef unsigned char *out
    cdef unsigned char *data
    cdef crc32c_shift_t scratch
    cdef bytes full = shift_for(block_size)
    cdef const char *full_ptr = full
    if views == NULL or firsts == NULL:
        free(views)
        free(firsts)
        raise MemoryError()
    cdef Py_ssize_t got = 0
    try:
        for i in range(npieces):
            start, end, buf = pieces[i]
            PyObject_GetBuffer(buf, &views[i], PyBUF_SIMPLE)
            got += 1
            if end <= start or <uint64_t>views[i].len != (end - start) * <uint64_t>block_size:
                raise ValueError(
                    f"piece [{start}, {end}) holds {views[i].len} bytes, not whole blocks of "
                    f"{block_size}"
                )
            firsts[i] = start
            nblocks += end - start
        zero = <unsigned char *>malloc(max(nblocks, 1))
        ext_off = <uint64_t *>malloc(max(nblocks, 1) * sizeof(uint64_t))
        ext_len = <uint32_t *>malloc(max(nblocks, 1) * sizeof(uint32_t))
        crcs = <uint32_t *>malloc(max(nblocks, 1) * sizeof(uint32_t))
        if zero == NULL or ext_off == NULL or ext_len == NULL or crcs == NULL:
            raise MemoryError()
        zeros = []
        with nogil:
            at = 0
            for i in range(npieces):
                for k in range(views[i].len // block_size):
                    zero[at] = all_zero(
                        <const unsigned char *>views[i].buf + k * block_size, block_size
                    )
                    block = firsts[i] + k
                    if not zero[at]:
                        if have_nz and block == last_nz + 1:
                            ext_len[nextents - 1] += block_size
                        else:
                            ext_off[nextents] = block * block_size
                            ext_len[nextents] = block_size
                            nextents += 1
                        have_nz = True
                        last_nz = block
                        nz += 1
                    at += 1
        at = 0
        for i in range(npieces):  # the zero runs (rare: a list of Python tuples)
            for k in range(views[i].len // block_size):
                if zero[at]:
                    block = firsts[i] + k
                    if zero_len and zero_start + zero_len == block:
                        zero_len += 1
                    else:
                        if zero_len:
                            zeros.append((zero_start * block_size, zero_len * block_size))
                        zero_start, zero_len = block, 1
                at += 1
        if zero_len:
            zeros.append((zero_start * block_size, zero_len * block_size))
        if nz == 0:
            return None, 0, 0, 0, zeros
        head_len = COUNT_SIZE + ENTRY_SIZE * nextents + CRC_SIZE * nz
        payload = PyBytes_FromStringAndSize(NULL, head_len + nz * block_size)
        out = <unsigned char *>PyBytes_AS_STRING(payload)
        with nogil:
            data = out + head_len
            at = 0
            for i in range(npieces):
                for k in range(views[i].len // block_size):
                    if not zero[at]:
                        memcpy(data + done * block_size,
                               <const unsigned char *>views[i].buf + k * block_size, block_size)
                        done += 1
                    at += 1
            crc32c_blocks(data, nz * block_size, block_size, crcs, HARDWARE,
                          <const crc32c_shift_t *>full_ptr, &scratch)
            put_be32(out, <uint32_t>nextents)
            for i in range(nextents):
                put_be64(out + COUNT_SIZE + ENTRY_SIZE * i, ext_off[i])
                put_be32(out + COUNT_SIZE + ENTRY_SIZE * i + 8, ext_len[i])
                total_len += ext_len[i]
            for i in range(nz):
                put_be32(out + COUNT_SIZE + ENTRY_SIZE * nextents + CRC_SIZE * i, crcs[i])
        return payload, head_len, ext_off[0], total_len, zeros
    finally:
        for i in range(got):
            PyBuffer_Release(&views[i])
        free(views)
        free(firsts)
        free(zero)
        free(ext_off)
        free(ext_len)
        free(crcs)
