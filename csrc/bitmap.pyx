# cython: cdivision=True
"""The dirty-block bitmap in C: a three-level table of lazily allocated pages of bits.

Every Python method runs under the GIL and never calls back into Python while it changes the
table, so marks from several threads, cut() and clear() are atomic with respect to each other.
mark_span() and mark_range_nogil() run without the GIL: a caller that uses them must hold a lock
of its own that every other user of the bitmap also takes (the tracker's Mutex).
"""

from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

import numpy as np

cdef extern from *:
    int popcount "__builtin_popcountll"(unsigned long long) noexcept nogil
    int ctz "__builtin_ctzll"(unsigned long long) noexcept nogil
    void prefetch_write "__builtin_prefetch"(const void *, int, int) noexcept nogil

_MAX_SIZE = 1 << 50   # 1 PiB: keeps the root table small (128 KiB at 512-byte blocks)
cdef uint64_t ONES = 0xFFFFFFFFFFFFFFFFULL
cdef Py_ssize_t PREFETCH = 16   # mark_many touches the word of the mark this far ahead
cdef Py_ssize_t PAGE_BYTES = PAGE_WORDS * 8
cdef uint64_t FREE_WITHOUT_GIL = 64   # pages: freeing more than this lets other threads run


cdef inline uint64_t word_mask(uint64_t lo, uint64_t hi) noexcept nogil:
    """Bits lo..hi (inclusive, 0..63) of a word."""
    return (ONES << lo) & (ONES >> (63 - hi))


cdef uint64_t set_bits(uint64_t *page, uint64_t lo, uint64_t hi) noexcept nogil:
    """Set bits lo..hi of a page; the number newly set."""
    cdef uint64_t w = lo >> 6, last = hi >> 6, added = 0, mask
    while w <= last:
        mask = word_mask(lo & 63 if w == lo >> 6 else 0, hi & 63 if w == last else 63)
        added += popcount(mask & ~page[w])
        page[w] |= mask
        w += 1
    return added


cdef uint64_t clear_bits(uint64_t *page, uint64_t lo, uint64_t hi) noexcept nogil:
    """Clear bits lo..hi of a page; the number that were set."""
    cdef uint64_t w = lo >> 6, last = hi >> 6, removed = 0, mask
    while w <= last:
        mask = word_mask(lo & 63 if w == lo >> 6 else 0, hi & 63 if w == last else 63)
        removed += popcount(mask & page[w])
        page[w] &= ~mask
        w += 1
    return removed


cdef bint any_bits(const uint64_t *page, uint64_t lo, uint64_t hi) noexcept nogil:
    cdef uint64_t w = lo >> 6, last = hi >> 6
    while w <= last:
        if page[w] & word_mask(lo & 63 if w == lo >> 6 else 0, hi & 63 if w == last else 63):
            return True
        w += 1
    return False


cdef void free_table(Mid **root, uint64_t nroot) noexcept nogil:
    cdef uint64_t r
    cdef int p
    if root == NULL:
        return
    for r in range(nroot):
        if root[r] != NULL:
            for p in range(PAGES_PER_MID):
                free(root[r].pages[p])
            free(root[r])
    free(root)


cdef uint64_t table_pages(Mid **root, uint64_t nroot) noexcept nogil:
    cdef uint64_t r, n = 0
    if root == NULL:   # a bitmap whose set-up failed half-way
        return 0
    for r in range(nroot):
        if root[r] != NULL:
            n += root[r].used
    return n


def _as_u64(values, name: str):
    """A contiguous uint64 array of the values, refusing negative or non-integer ones."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    if arr.dtype != np.uint64:
        if arr.size == 0:
            return np.zeros(0, dtype=np.uint64)
        if arr.dtype.kind == "O" and all(isinstance(v, int) for v in arr.tolist()):
            raise ValueError(f"{name} must be in 0..2**64-1")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integers in 0..2**64-1, got dtype {arr.dtype}")
        if arr.dtype.kind == "i" and (arr < 0).any():
            raise ValueError(f"{name} must not be negative")
    return np.ascontiguousarray(arr, dtype=np.uint64)


cdef uint64_t as_offset(object value, str name) except? 0xFFFFFFFFFFFFFFFF:
    """A Python integer as uint64; ValueError (not OverflowError) if negative or huge."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or v < 0:
        raise ValueError(f"{name} {value} is out of range: must be in 0..2**63-1")
    return <uint64_t>v


cdef inline uint64_t *page_of(Bitmap bm, uint64_t block) noexcept:
    """The page holding a block, or NULL."""
    cdef Mid *mid = bm.root[block >> MID_BLOCK_SHIFT]
    return NULL if mid == NULL else mid.pages[(block >> PAGE_SHIFT) & (PAGES_PER_MID - 1)]


cdef inline int mark_one(Bitmap bm, uint64_t block) noexcept nogil:
    """Dirty one block: the hot path of every 4 KiB write. -1 if a page cannot be allocated."""
    cdef Mid *mid = bm.root[block >> MID_BLOCK_SHIFT]
    cdef uint64_t *page
    cdef uint64_t *word
    cdef uint64_t added
    cdef uint32_t p = (block >> PAGE_SHIFT) & (PAGES_PER_MID - 1)
    if mid == NULL or mid.pages[p] == NULL:
        page = bm._page_nogil(block >> PAGE_SHIFT, &mid)
        if page == NULL:
            return -1
    else:
        page = mid.pages[p]
    word = &page[(block >> 6) & (PAGE_WORDS - 1)]
    added = ((word[0] >> (block & 63)) & 1) ^ 1
    word[0] |= 1ULL << (block & 63)
    mid.counts[p] += added
    bm.ndirty += added
    return 0


cdef inline int mark_block(Bitmap bm, uint64_t block) except -1:
    if mark_one(bm, block) != 0:
        raise MemoryError("cannot allocate a bitmap page")
    return 0


cdef class Bitmap:
    """Dirty blocks of a volume of `size` bytes in blocks of `block_size` bytes."""

    def __init__(self, size, block_size=4096):
        cdef uint32_t shift = 0
        if self.root != NULL:
            raise RuntimeError("bitmap is already initialised")
        if not isinstance(size, int) or not isinstance(block_size, int):
            raise TypeError("size and block_size must be integers")
        if block_size < 512 or block_size > (1 << 20) or block_size & (block_size - 1):
            raise ValueError(f"block_size {block_size} is not a power of two in 512..1 MiB")
        if size <= 0 or size > _MAX_SIZE:
            raise ValueError(f"size {size} is not in 1..{_MAX_SIZE} bytes")
        while (1 << shift) < block_size:
            shift += 1
        self._setup(size, shift)

    cdef int _setup(self, uint64_t size, uint32_t shift) except -1:
        self.size_ = size
        self.shift = shift
        self.nblocks_ = (size + (1ULL << shift) - 1) >> shift
        self.nroot = (self.nblocks_ + (1ULL << MID_BLOCK_SHIFT) - 1) >> MID_BLOCK_SHIFT
        self.root = self._empty_root()
        return 0

    cdef Mid **_empty_root(self) except NULL:
        cdef Mid **root = <Mid **>calloc(self.nroot if self.nroot else 1, sizeof(Mid *))
        if root == NULL:
            raise MemoryError("cannot allocate the bitmap's root table")
        return root

    cdef Bitmap _sibling(self):
        """An empty bitmap of the same class and geometry, without its root table."""
        cdef Bitmap other = Bitmap.__new__(type(self))
        other.size_ = self.size_
        other.shift = self.shift
        other.nblocks_ = self.nblocks_
        other.nroot = self.nroot
        return other

    def __dealloc__(self):
        cdef Mid **root = self.root
        cdef uint64_t nroot = self.nroot
        self.root = NULL
        if table_pages(root, nroot) > FREE_WITHOUT_GIL:
            with nogil:
                free_table(root, nroot)
        else:
            free_table(root, nroot)

    @property
    def size(self) -> int:
        return self.size_

    @property
    def block_size(self) -> int:
        return 1 << self.shift

    @property
    def nblocks(self) -> int:
        return self.nblocks_

    # --- the table ---------------------------------------------------------------------------

    cdef uint64_t *_page_nogil(self, uint64_t pidx, Mid **mid_out) noexcept nogil:
        """The page holding page index pidx, allocated if absent; NULL if memory ran out."""
        cdef uint64_t r = pidx >> MID_SHIFT
        cdef uint32_t p = pidx & (PAGES_PER_MID - 1)
        cdef Mid *mid = self.root[r]
        if mid == NULL:
            mid = <Mid *>calloc(1, sizeof(Mid))
            if mid == NULL:
                return NULL
            self.root[r] = mid
        if mid.pages[p] == NULL:
            mid.pages[p] = <uint64_t *>calloc(PAGE_WORDS, 8)
            if mid.pages[p] == NULL:
                return NULL
            mid.used += 1
        mid_out[0] = mid
        return mid.pages[p]

    cdef uint64_t *_page(self, uint64_t pidx, Mid **mid_out) except NULL:
        cdef uint64_t *page = self._page_nogil(pidx, mid_out)
        if page == NULL:
            raise MemoryError("cannot allocate a bitmap page")
        return page

    cdef void _drop_page(self, uint64_t pidx) noexcept:
        cdef uint64_t r = pidx >> MID_SHIFT
        cdef Mid *mid = self.root[r]
        free(mid.pages[pidx & (PAGES_PER_MID - 1)])
        mid.pages[pidx & (PAGES_PER_MID - 1)] = NULL
        mid.used -= 1
        if mid.used == 0:
            free(mid)
            self.root[r] = NULL

    cdef int mark_span(self, uint64_t first, uint64_t last) noexcept nogil:
        """Dirty blocks first..last (inclusive, already checked against the volume); -1 if
        memory ran out (the blocks before the failing page stay marked: over-reporting)."""
        cdef Mid *mid
        cdef uint64_t *page
        cdef uint64_t pidx, stop, added
        if first == last:
            return mark_one(self, first)
        while first <= last:
            pidx = first >> PAGE_SHIFT
            stop = min(last, (pidx << PAGE_SHIFT) | PAGE_MASK)
            page = self._page_nogil(pidx, &mid)
            if page == NULL:
                return -1
            added = set_bits(page, first & PAGE_MASK, stop & PAGE_MASK)
            mid.counts[pidx & (PAGES_PER_MID - 1)] += added
            self.ndirty += added
            first = stop + 1
        return 0

    cdef int mark_blocks(self, uint64_t first, uint64_t last) except -1:
        if self.mark_span(first, last) != 0:
            raise MemoryError("cannot allocate a bitmap page")
        return 0

    cdef int mark_range_nogil(self, uint64_t offset, uint64_t length) noexcept nogil:
        """mark_range without the GIL (see the module's docstring for the lock it needs);
        -1 for a range outside the volume or when memory ran out, so the caller can retry
        with the GIL and get the exception."""
        if length == 0 or offset > self.size_ or length > self.size_ - offset:
            return -1
        return self.mark_span(offset >> self.shift, (offset + length - 1) >> self.shift)

    cdef int _check(self, uint64_t offset, uint64_t length) except -1:
        if length == 0 or offset > self.size_ or length > self.size_ - offset:
            raise ValueError(
                f"bad range offset={offset} length={length}: need length > 0 and "
                f"offset + length <= the volume size {self.size_}"
            )
        return 0

    cdef int mark_range(self, uint64_t offset, uint64_t length) except -1:
        """Dirty every block the byte range touches."""
        self._check(offset, length)
        self.mark_blocks(offset >> self.shift, (offset + length - 1) >> self.shift)
        return 0

    cdef int clear_range(self, uint64_t offset, uint64_t length) except -1:
        """Clean the blocks the byte range covers entirely (the volume's last, partial block
        counts as covered when the range reaches the end)."""
        cdef uint64_t first, end, pidx, stop, removed
        cdef Mid *mid
        self._check(offset, length)
        first = (offset + (1ULL << self.shift) - 1) >> self.shift
        end = self.nblocks_ if offset + length == self.size_ else (offset + length) >> self.shift
        while first < end:
            pidx = first >> PAGE_SHIFT
            stop = min(end - 1, (pidx << PAGE_SHIFT) | PAGE_MASK)
            mid = self.root[pidx >> MID_SHIFT]
            if mid == NULL:
                first = ((pidx >> MID_SHIFT) + 1) << MID_BLOCK_SHIFT
                continue
            if mid.pages[pidx & (PAGES_PER_MID - 1)] != NULL:
                removed = clear_bits(
                    mid.pages[pidx & (PAGES_PER_MID - 1)], first & PAGE_MASK, stop & PAGE_MASK
                )
                mid.counts[pidx & (PAGES_PER_MID - 1)] -= removed
                self.ndirty -= removed
                if mid.counts[pidx & (PAGES_PER_MID - 1)] == 0:
                    self._drop_page(pidx)
            first = stop + 1
        return 0

    cdef uint64_t next_set(self, uint64_t block) noexcept nogil:
        """The first dirty block at or after `block`, or nblocks."""
        cdef Mid *mid
        cdef const uint64_t *page
        cdef uint64_t w, word
        while block < self.nblocks_:
            mid = self.root[block >> MID_BLOCK_SHIFT]
            if mid == NULL:
                block = ((block >> MID_BLOCK_SHIFT) + 1) << MID_BLOCK_SHIFT
                continue
            page = mid.pages[(block >> PAGE_SHIFT) & (PAGES_PER_MID - 1)]
            if page != NULL:
                w = (block >> 6) & (PAGE_WORDS - 1)
                word = page[w] & (ONES << (block & 63))
                while True:
                    if word:
                        return (block & ~PAGE_MASK) + (w << 6) + ctz(word)
                    w += 1
                    if w == PAGE_WORDS:
                        break
                    word = page[w]
            block = ((block >> PAGE_SHIFT) + 1) << PAGE_SHIFT
        return self.nblocks_

    cdef uint64_t next_clear(self, uint64_t block) noexcept nogil:
        """The first clean block at or after `block`, or nblocks."""
        cdef Mid *mid
        cdef const uint64_t *page
        cdef uint64_t w, word
        while block < self.nblocks_:
            mid = self.root[block >> MID_BLOCK_SHIFT]
            if mid == NULL:
                return block
            page = mid.pages[(block >> PAGE_SHIFT) & (PAGES_PER_MID - 1)]
            if page == NULL:
                return block
            w = (block >> 6) & (PAGE_WORDS - 1)
            word = ~page[w] & (ONES << (block & 63))
            while True:
                if word:
                    return min(self.nblocks_, (block & ~PAGE_MASK) + (w << 6) + ctz(word))
                w += 1
                if w == PAGE_WORDS:
                    break
                word = ~page[w]
            block = ((block >> PAGE_SHIFT) + 1) << PAGE_SHIFT
        return self.nblocks_

    # --- the Python API ----------------------------------------------------------------------

    def mark(self, offset, length, /) -> None:
        """Dirty every block the byte range touches (partial blocks count)."""
        cdef uint64_t o = as_offset(offset, "offset"), n = as_offset(length, "length")
        cdef uint64_t first, last
        if n == 0 or o > self.size_ or n > self.size_ - o:
            self._check(o, n)   # raises
        first = o >> self.shift
        last = (o + n - 1) >> self.shift
        if first == last:
            mark_block(self, first)
        else:
            self.mark_blocks(first, last)

    def mark_many(self, offsets, lengths) -> None:
        """Mark each (offset, length) pair of two equally long integer arrays or sequences.

        Every range is checked before any is marked, so a bad batch changes nothing.
        """
        cdef const uint64_t[::1] offs = _as_u64(offsets, "offsets")
        cdef const uint64_t[::1] lens = _as_u64(lengths, "lengths")
        cdef Py_ssize_t i, n = offs.shape[0]
        cdef uint64_t o, k, first, last, limit = self.size_
        cdef uint64_t *page
        if lens.shape[0] != n:
            raise ValueError(f"{n} offsets but {lens.shape[0]} lengths")
        for i in range(n):
            o = offs[i]
            k = lens[i]
            if k == 0 or o > limit or k > limit - o:
                raise ValueError(
                    f"bad range #{i} offset={o} length={k}: need length > 0 and "
                    f"offset + length <= the volume size {limit}"
                )
        for i in range(n):
            if i + PREFETCH < n:   # random marks miss the cache: start the next loads early
                first = offs[i + PREFETCH] >> self.shift
                page = page_of(self, first)
                if page != NULL:
                    prefetch_write(&page[(first >> 6) & (PAGE_WORDS - 1)], 1, 3)
            o = offs[i]
            first = o >> self.shift
            last = (o + lens[i] - 1) >> self.shift
            if first == last:
                mark_block(self, first)
            else:
                self.mark_blocks(first, last)

    def clear(self, offset, length) -> None:
        """Clean the blocks the range covers entirely, so no mark outside it is dropped."""
        self.clear_range(as_offset(offset, "offset"), as_offset(length, "length"))

    def test(self, offset, length=1) -> bool:
        """Whether any block the byte range touches is dirty."""
        cdef uint64_t o = as_offset(offset, "offset"), n = as_offset(length, "length")
        cdef uint64_t first, last, stop, pidx
        cdef Mid *mid
        self._check(o, n)
        first = o >> self.shift
        last = (o + n - 1) >> self.shift
        while first <= last:
            pidx = first >> PAGE_SHIFT
            stop = min(last, (pidx << PAGE_SHIFT) | PAGE_MASK)
            mid = self.root[pidx >> MID_SHIFT]
            if mid == NULL:
                first = ((pidx >> MID_SHIFT) + 1) << MID_BLOCK_SHIFT
                continue
            if mid.pages[pidx & (PAGES_PER_MID - 1)] != NULL and any_bits(
                mid.pages[pidx & (PAGES_PER_MID - 1)], first & PAGE_MASK, stop & PAGE_MASK
            ):
                return True
            first = stop + 1
        return False

    def count(self) -> int:
        """Number of dirty blocks."""
        return self.ndirty

    def extents(self, max_length=None):
        """Runs of dirty blocks as (offset, length) in bytes, each at most max_length bytes.

        A live view: marks made during the iteration may or may not show. Iterate over the
        result of cut() or copy() for a stable set.
        """
        cdef uint64_t cap = 0
        if max_length is not None:
            if max_length < (1 << self.shift):
                raise ValueError(
                    f"max_length {max_length} is smaller than the block size {1 << self.shift}"
                )
            cap = min(max_length >> self.shift, self.nblocks_)
        return _Extents(self, cap)

    def union(self, Bitmap other not None) -> None:
        """Add the other bitmap's dirty blocks to this one (same geometry only)."""
        cdef uint64_t r, added, pidx
        cdef int p, w
        cdef Mid *mid
        cdef uint64_t *page
        cdef const uint64_t *src
        if other.size_ != self.size_ or other.shift != self.shift:
            raise ValueError(
                f"geometry differs: size/block size {other.size_}/{1 << other.shift} "
                f"vs {self.size_}/{1 << self.shift}"
            )
        if other is self:
            return
        for r in range(self.nroot):
            if other.root[r] == NULL:
                continue
            for p in range(PAGES_PER_MID):
                src = other.root[r].pages[p]
                if src == NULL:
                    continue
                pidx = (r << MID_SHIFT) | p
                page = self._page(pidx, &mid)
                added = 0
                for w in range(PAGE_WORDS):
                    added += popcount(src[w] & ~page[w])
                    page[w] |= src[w]
                mid.counts[p] += added
                self.ndirty += added

    def cut(self):
        """Hand back the current set and leave this bitmap empty: a pointer swap, O(1)."""
        cdef Bitmap taken = self._sibling()
        cdef Mid **empty = self._empty_root()
        taken.root = self.root
        taken.ndirty = self.ndirty
        self.root = empty
        self.ndirty = 0
        return taken

    def copy(self):
        """An independent bitmap with the same dirty blocks."""
        cdef Bitmap twin = self._sibling()
        cdef uint64_t r
        cdef int p
        cdef Mid *mid
        cdef uint64_t *page
        twin.root = twin._empty_root()
        for r in range(self.nroot):
            if self.root[r] == NULL:
                continue
            for p in range(PAGES_PER_MID):
                if self.root[r].pages[p] != NULL:
                    page = twin._page((r << MID_SHIFT) | p, &mid)
                    memcpy(page, self.root[r].pages[p], PAGE_BYTES)
                    mid.counts[p] = self.root[r].counts[p]
        twin.ndirty = self.ndirty
        return twin

    def _pages(self):
        """(page index, bits as bytes) of every non-empty page, in order: the file format's
        records. Block i of a page is bit i % 8 of byte i // 8 (little-endian words)."""
        cdef uint64_t r
        cdef int p
        for r in range(self.nroot):
            for p in range(PAGES_PER_MID):
                if self.root[r] != NULL and self.root[r].pages[p] != NULL:
                    yield (r << MID_SHIFT) | p, (<char *>self.root[r].pages[p])[:PAGE_BYTES]

    def _or_page(self, uint64_t pidx, const unsigned char[::1] bits not None) -> None:
        """Add a page of bits read from a file (checked: in range, nothing past the end)."""
        cdef Mid *mid
        cdef uint64_t *page
        cdef uint64_t word, added = 0, used, base
        cdef int w
        if bits.shape[0] != PAGE_BYTES:
            raise ValueError(f"a page is {PAGE_BYTES} bytes, got {bits.shape[0]}")
        if pidx > (self.nblocks_ - 1) >> PAGE_SHIFT:
            raise ValueError(f"page {pidx} is beyond the volume")
        used = self.nblocks_ - (pidx << PAGE_SHIFT)   # blocks of this page inside the volume
        for w in range(PAGE_WORDS):
            memcpy(&word, &bits[w * 8], 8)
            base = w * 64
            if base + 64 > used and word & (ONES if base >= used else ONES << (used - base)):
                raise ValueError("blocks marked beyond the end of the volume")
        page = self._page(pidx, &mid)
        for w in range(PAGE_WORDS):
            memcpy(&word, &bits[w * 8], 8)
            added += popcount(word & ~page[w])
            page[w] |= word
        mid.counts[pidx & (PAGES_PER_MID - 1)] += added
        self.ndirty += added
        if mid.counts[pidx & (PAGES_PER_MID - 1)] == 0:
            self._drop_page(pidx)

    def _memory(self) -> int:
        """Bytes of table memory in use: shows it follows the dirty part, not the volume."""
        cdef uint64_t r, nodes = 0
        for r in range(self.nroot):
            if self.root[r] != NULL:
                nodes += 1
        return (self.nroot * sizeof(Mid *) + nodes * sizeof(Mid)
                + table_pages(self.root, self.nroot) * PAGE_BYTES)


cdef class _Extents:
    """Iterator over a bitmap's runs; keeps no pointer into the table between steps."""

    cdef Bitmap bitmap
    cdef uint64_t cursor, start, end, cap

    def __cinit__(self, Bitmap bitmap not None, uint64_t cap):
        self.bitmap = bitmap
        self.cap = cap

    def __iter__(self):
        return self

    def __next__(self):
        cdef Bitmap bm = self.bitmap
        cdef uint64_t stop, offset
        if self.start >= self.end:
            self.start = bm.next_set(self.cursor)
            if self.start >= bm.nblocks_:
                raise StopIteration
            self.end = bm.next_clear(self.start + 1)
            self.cursor = self.end
        stop = self.end if self.cap == 0 else min(self.end, self.start + self.cap)
        offset = self.start << bm.shift
        self.start = stop
        return offset, min(stop << bm.shift, bm.size_) - offset
