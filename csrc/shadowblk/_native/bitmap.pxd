# The dirty-block bitmap's C-level interface, for other Cython code (the NBD server's hot loop).
# Block b lives in page b >> PAGE_SHIFT (a lazily allocated array of PAGE_WORDS uint64 words),
# reached through a Mid node (PAGES_PER_MID page pointers) in the root table: memory follows
# the dirty part, not the volume size. Callers hold the GIL: it is what makes cut() atomic;
# the nogil methods are for callers that hold a lock every other user of the bitmap takes too.

from libc.stdint cimport uint32_t, uint64_t


cdef enum:
    PAGE_SHIFT = 15                      # 32768 blocks (4 KiB of bits) per page
    PAGE_MASK = 32767
    PAGE_WORDS = 512
    MID_SHIFT = 9                        # 512 pages per mid node
    PAGES_PER_MID = 512
    MID_BLOCK_SHIFT = 24                 # blocks under one mid node: 2 ** (15 + 9)


cdef struct Mid:
    uint64_t *pages[PAGES_PER_MID]
    uint32_t counts[PAGES_PER_MID]       # dirty blocks in each page; 0 means freed
    uint32_t used                        # pages allocated


cdef class Bitmap:
    cdef uint64_t size_
    cdef uint64_t nblocks_
    cdef uint32_t shift                  # log2(block size)
    cdef uint64_t nroot
    cdef Mid **root
    cdef uint64_t ndirty

    cdef int _setup(self, uint64_t size, uint32_t shift) except -1
    cdef Mid **_empty_root(self) except NULL
    cdef Bitmap _sibling(self)
    cdef uint64_t *_page_nogil(self, uint64_t pidx, Mid **mid_out) noexcept nogil
    cdef uint64_t *_page(self, uint64_t pidx, Mid **mid_out) except NULL
    cdef void _drop_page(self, uint64_t pidx) noexcept
    cdef int _check(self, uint64_t offset, uint64_t length) except -1
    cdef int mark_range(self, uint64_t offset, uint64_t length) except -1
    cdef int clear_range(self, uint64_t offset, uint64_t length) except -1
    cdef int mark_span(self, uint64_t first, uint64_t last) noexcept nogil
    cdef int mark_blocks(self, uint64_t first, uint64_t last) except -1
    cdef int mark_range_nogil(self, uint64_t offset, uint64_t length) noexcept nogil
    cdef uint64_t next_set(self, uint64_t block) noexcept nogil
    cdef uint64_t next_clear(self, uint64_t block) noexcept nogil
