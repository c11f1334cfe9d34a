# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The NBD transmission hot loop: READ, WRITE and FLUSH without the GIL, several workers per
connection.

A Connection is shared by a few Worker threads, like nbdkit's per-connection thread pool. The
worker holding the receive lock reads from the socket into its own buffer, takes every complete
request it finds (a pipelined batch), hands any partial tail to the next reader and lets go of
the lock; then it has the batch's writes marked (below) before any is issued, does
pread/pwrite/fdatasync, and sends the batch's replies under the send lock. So one worker
receives while others write, and small requests are still batched. A batch holds READs for at
most BATCH_READ bytes, so a queue of small READs is shared out between the workers. A batch of
small READs with nothing after it in the buffer (_quick) keeps the receive lock: its worker
reads the next requests itself instead of waking another one only to wait for them.

A WRITE of SPLICE_MIN bytes or more that heads a batch moves its payload from the socket into
the worker's pipe with splice() (still under the receive lock: the volume is touched only once
the whole request is in), and from the pipe onto the volume with splice() after it is tracked:
one copy of the payload instead of two (recv into the buffer, then pwrite). Not with observers,
which need the payload in memory; a volume that refuses splice() gets pwrite() again.

A request the fast path does not handle (other commands, bad flags or ranges, bad magic) makes
run() return SLOW with the receive lock still held: the Python handler
(shadowblk.nbd.transmission) reads it with take(), answers through Connection.send(), and calls
run() again.

Write observers (replication, checksum maps), when the tracker has some as the connection
starts, get the batch's payloads in one GIL acquisition (tracker.observe_writes). Marking the
dirty bitmap needs no GIL: under the tracker's Mutex the loop checks that every region the
batch touches is in the activity log already and marks the blocks; only a write into a region
not yet logged goes to Python (tracker.before_writes logs it durably first), and so does the
first write into an AHEAD region (which has the next window logged in the background, no sync).
`tracker.ordering` is taken before the next worker may read (so one connection's write batches
keep their arrival order) and held until the batch's last pwrite (so
observers see writes in the order the volume gets them). A FLUSH or a FUA write ends its batch;
after its fdatasync the ordering lock is let go and tracker.after_flush() runs before its reply
is built (a `sync` replicator holds the reply there until the shadows have the data).
"""

from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove
from libc.errno cimport (
    errno, EINTR, EAGAIN, EPERM, EROFS, ENOSPC, EDQUOT, EFBIG, EINVAL, ENOMEM, ESHUTDOWN,
)
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.types cimport off_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from shadowblk._native.bitmap cimport Bitmap
from shadowblk._native.mutex cimport Mutex

import logging

cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, off_t offset)
    ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
    int fdatasync(int fd)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT

cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int fd_in, off_t *off_in, int fd_out, off_t *off_out, size_t n,
                   unsigned int flags)
    int pipe2(int *fds, int flags)
    int fcntl(int fd, int cmd, ...)
    int O_CLOEXEC
    int O_NONBLOCK
    int F_SETPIPE_SZ
    int F_GETPIPE_SZ
    unsigned int SPLICE_F_MOVE
    unsigned int SPLICE_F_NONBLOCK

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    int close(int fd)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)
    int RWF_NOWAIT

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN
    short POLLOUT

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef extern from "<endian.h>" nogil:
    uint16_t be16toh(uint16_t x)
    uint32_t be32toh(uint32_t x)
    uint64_t be64toh(uint64_t x)
    uint16_t htobe16(uint16_t x)
    uint32_t htobe32(uint32_t x)
    uint64_t htobe64(uint64_t x)

log = logging.getLogger("shadowblk.nbd.transmission")

cdef enum:
    HDR = 28
    BATCH = 64
    REQUEST_MAGIC = 0x25609513
    SIMPLE_MAGIC = 0x67446698
    STRUCTURED_MAGIC = 0x668E33EF
    CMD_READ = 0
    CMD_WRITE = 1
    CMD_FLUSH = 3
    FLAG_FUA = 1
    FLAG_DF = 4
    REPLY_FLAG_DONE = 1
    TYPE_NONE = 0
    TYPE_OFFSET_DATA = 1
    TYPE_ERROR = 32769
    POLL_MS = 200
    STOP_SEND_MS = 5000  # at a stop, how long a client that takes no reply bytes is waited for
    GREEDY_RECV = 262144  # most bytes read ahead of a request whose size is not known yet
    SEND_EARLY = 16384
    # a batch stops once its READs ask this much: the next worker takes the rest, so a reader's
    # queue is answered by several workers at once (four 4 KiB READs a batch, one 1 MiB READ)
    BATCH_READ = 16384
    SPLICE_MIN = 65536  # a WRITE this big moves its payload socket -> pipe -> volume (one copy)
    SPLICE_PIPE = 1048576  # the pipe asked for (Linux's default limit): longer payloads use recv
    NBD_EIO = 5
    REGION_COLD = 0  # shadowblk.tracking.tracker: COLD, CARRIED, WRITTEN, PENDING, AHEAD
    REGION_WRITTEN = 2
    REGION_PENDING = 3  # being logged by another batch: not durable yet
    REGION_AHEAD = 4  # logged; its first write has the tracker log the next window (no fsync)
    LOOP_CLOSED = 0
    LOOP_SLOW = 1
    LOOP_STOPPED = 2

# run() results, for Python
CLOSED = LOOP_CLOSED
SLOW = LOOP_SLOW
STOPPED = LOOP_STOPPED


cdef struct Request:
    uint16_t flags
    uint16_t cmd
    uint64_t cookie  # as sent, never byte-swapped
    uint64_t offset
    uint32_t length
    size_t data  # where the payload starts in the worker's inbuf
    uint32_t piped  # how much of the payload's tail waits in the worker's pipe instead


cdef class StopFlag:
    """Set once by the server at shutdown; every worker sees it within POLL_MS."""

    cdef int value

    def set(self):
        self.value = 1

    def is_set(self):
        return self.value != 0


cdef inline uint32_t nbd_errno(int err) noexcept nogil:
    if err == EPERM or err == EROFS:
        return 1
    if err == ENOSPC or err == EDQUOT or err == EFBIG:
        return 28
    if err == EINVAL:
        return 22
    if err == ENOMEM:
        return 12
    if err == ESHUTDOWN:  # a fenced primary (shadowblk.nbd.fence)
        return 108
    return NBD_EIO


cdef uint32_t refusal_errno(exc):
    """The NBD error for an exception of the tracker or an observer (an OSError keeps its errno)."""
    if isinstance(exc, OSError) and exc.errno:
        return nbd_errno(exc.errno)
    return NBD_EIO


cdef inline void put32(char *p, uint32_t v) noexcept nogil:
    v = htobe32(v)
    memcpy(p, &v, 4)


cdef inline void put16(char *p, uint16_t v) noexcept nogil:
    v = htobe16(v)
    memcpy(p, &v, 2)


cdef inline void put64(char *p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)


cdef inline double monotonic_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1000000.0


cdef int grow(char **buf, size_t *cap, size_t need) noexcept nogil:
    cdef size_t n = cap[0] if cap[0] else 4096
    while n < need:
        n *= 2
    cdef char *p = <char *>realloc(buf[0], n)
    if p == NULL:
        return -1
    buf[0] = p
    cap[0] = n
    return 0


cdef class Connection:
    """What the workers of one client connection share: the socket, the volume, two locks and
    the partial request one reader leaves to the next."""

    cdef int sock
    cdef int vol
    cdef uint64_t size
    cdef uint32_t max_payload
    cdef bint read_only
    cdef bint structured
    cdef object tracker
    cdef Mutex t_mutex
    cdef bint observed
    cdef Mutex t_ordering  # tracker.ordering: taken and let go without the GIL
    cdef Bitmap t_bitmap
    cdef object t_hot_pin  # a memoryview: the bytearray cannot be resized (moved) under t_hot
    cdef char *t_hot
    cdef Py_ssize_t t_regions
    cdef int t_shift
    cdef StopFlag stop_flag
    cdef int *stopping
    cdef int closing
    cdef int dropped  # a reply was given up part-way: nothing more may go out on the socket
    cdef pthread_mutex_t recv_lock
    cdef pthread_mutex_t send_lock
    cdef char *carry
    cdef size_t carry_len
    cdef size_t carry_cap
    cdef bint big_writes  # the last request parsed was a WRITE of SPLICE_MIN or more
    cdef bint splice_ok  # the volume takes splice() (cleared on the first EINVAL)

    def __cinit__(
        self, int sock, int vol, uint64_t size, uint32_t max_payload, bint read_only,
        bint structured, object tracker, StopFlag stop_flag not None,
    ):
        self.sock = sock
        self.vol = vol
        self.size = size
        self.max_payload = max_payload
        self.read_only = read_only
        self.structured = structured
        self.tracker = tracker
        if tracker is not None:
            # the tracker never replaces these objects, it changes them in place
            self.t_mutex = tracker.lock
            self.t_bitmap = tracker.bitmap
            self.t_hot_pin = memoryview(tracker.hot)
            self.t_hot = PyByteArray_AS_STRING(tracker.hot)
            self.t_regions = PyByteArray_GET_SIZE(tracker.hot)
            self.t_shift = tracker.region_shift
            self.observed = bool(tracker.observers)
            self.t_ordering = tracker.ordering
        self.stop_flag = stop_flag
        self.stopping = &stop_flag.value
        self.splice_ok = not read_only
        pthread_mutex_init(&self.recv_lock, NULL)
        pthread_mutex_init(&self.send_lock, NULL)

    def __dealloc__(self):
        pthread_mutex_destroy(&self.recv_lock)
        pthread_mutex_destroy(&self.send_lock)
        free(self.carry)

    def send(self, bytes data not None):
        """Send a reply built in Python, never interleaved with the workers' replies."""
        cdef const char *p = PyBytes_AS_STRING(data)
        cdef size_t n = PyBytes_GET_SIZE(data)
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self.send_lock)
            rc = self._send_all(p, n)
            pthread_mutex_unlock(&self.send_lock)
        if rc != 0:
            raise ConnectionError("client gone while sending a reply")

    def close(self):
        """Make every worker end at its next turn."""
        self.closing = 1

    cdef int _send_all(self, const char *p, size_t n) noexcept nogil:
        """Nonzero when the client is gone (then every worker ends), or when the server stops
        and the client has taken no reply bytes for STOP_SEND_MS: a client that stopped
        reading must not hold up a clean stop (it is dropped, the others are not waiting). A
        client that reads, however slowly, gets its replies whole, stop or not."""
        cdef size_t done = 0
        cdef ssize_t sent
        cdef pollfd pfd
        cdef double stalled_since = -1.0  # monotonic ms; -1: bytes went out since the last wait
        cdef double now
        while done < n:
            if self.dropped:  # a reply cut short before: more bytes would be read as its data
                return 1
            # never blocks (the socket may be in blocking mode): a full socket buffer is
            # waited for in poll(), which lets a stop be seen
            sent = send(self.sock, p + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT)
            if sent > 0:
                done += sent
                stalled_since = -1.0
            elif sent < 0 and errno == EINTR:
                continue
            elif sent < 0 and errno == EAGAIN:
                if self.stopping[0]:
                    now = monotonic_ms()
                    if stalled_since < 0:
                        stalled_since = now
                    elif now - stalled_since >= STOP_SEND_MS:
                        self.dropped = 1
                        self.closing = 1
                        return 1
                pfd.fd = self.sock
                pfd.events = POLLOUT
                pfd.revents = 0
                poll(&pfd, 1, POLL_MS)
            else:
                self.dropped = 1
                self.closing = 1
                return 1
        return 0

    cdef bint _eligible(self, Request *r) noexcept nogil:
        """Whether the fast path may run R; everything else goes to Python."""
        if r.cmd == CMD_FLUSH:
            return (r.flags & ~FLAG_FUA) == 0
        if r.length == 0 or r.length > self.max_payload:
            return False
        if r.offset > self.size or r.length > self.size - r.offset:
            return False
        if r.cmd == CMD_READ:
            if self.structured:
                return (r.flags & ~(FLAG_FUA | FLAG_DF)) == 0
            return (r.flags & ~FLAG_FUA) == 0
        if r.cmd == CMD_WRITE:
            return not self.read_only and (r.flags & ~FLAG_FUA) == 0
        return False


cdef class Worker:
    """One thread's share of a connection: its own buffers and batch."""

    cdef Connection conn
    cdef char *inbuf
    cdef size_t incap
    cdef size_t inpos
    cdef size_t inend
    cdef char *outbuf
    cdef size_t outcap
    cdef size_t outlen
    cdef bint holding
    cdef bint ordered  # holding tracker.ordering
    cdef bint kept  # holding the receive lock for a quick batch
    cdef uint32_t refused  # the error of the batch's writes the tracker or an observer refused
    cdef int pipe_fd[2]  # a big WRITE's payload on its way from the socket to the volume
    cdef size_t pipe_cap  # 0: no pipe yet; -1 (as size_t): none to be had
    cdef Request batch[BATCH]

    def __cinit__(self, Connection conn not None):
        self.conn = conn
        self.pipe_fd[0] = self.pipe_fd[1] = -1
        if grow(&self.inbuf, &self.incap, GREEDY_RECV + HDR) != 0:
            raise MemoryError()
        if grow(&self.outbuf, &self.outcap, 65536) != 0:
            raise MemoryError()

    def __dealloc__(self):
        if self.holding:
            pthread_mutex_unlock(&self.conn.recv_lock)
        free(self.inbuf)
        free(self.outbuf)
        self._drop_pipe()

    def take(self, size_t n):
        """Up to N bytes still buffered, for the Python handler of a SLOW request."""
        cdef size_t avail = self.inend - self.inpos
        if n > avail:
            n = avail
        data = PyBytes_FromStringAndSize(self.inbuf + self.inpos, n)
        self.inpos += n
        return data

    def release(self):
        """Give up the receive lock after the Python handler failed (the connection is ending)."""
        self.conn.closing = 1
        if self.holding:
            self._release()

    def run(self):
        """Serve until the client goes (CLOSED), a request needs Python (SLOW, receive lock
        kept) or the server stops (STOPPED)."""
        cdef int status
        with nogil:
            status = self._run()
        if status < 0:
            self.conn.closing = 1
            raise MemoryError()
        return status

    cdef void _release(self) noexcept nogil:
        """Leave the unread tail to the next reader and let go of the receive lock."""
        cdef size_t rem = self.inend - self.inpos
        if rem:
            if rem > self.conn.carry_cap and grow(&self.conn.carry, &self.conn.carry_cap, rem) != 0:
                self.conn.closing = 1
            else:
                memcpy(self.conn.carry, self.inbuf + self.inpos, rem)
                self.conn.carry_len = rem
        self.inpos = self.inend = 0
        self.holding = 0
        pthread_mutex_unlock(&self.conn.recv_lock)

    cdef int _acquire(self) noexcept nogil:
        """Take the receive lock and the previous reader's tail; nonzero if the connection ends."""
        pthread_mutex_lock(&self.conn.recv_lock)
        self.holding = 1
        self.inpos = self.inend = 0
        if self.conn.closing:
            return 1
        if self.conn.carry_len:
            if self.conn.carry_len > self.incap and grow(&self.inbuf, &self.incap, self.conn.carry_len) != 0:
                self.conn.closing = 1
                return 1
            memcpy(self.inbuf, self.conn.carry, self.conn.carry_len)
            self.inend = self.conn.carry_len
            self.conn.carry_len = 0
        return 0

    cdef int _parse(self, int *slow, size_t *need) noexcept nogil:
        """Complete fast requests at the head of the buffer into the batch; returns how many.
        SLOW: a request for Python follows them. NEED: bytes the next request still lacks."""
        cdef size_t p = self.inpos, avail
        cdef uint32_t magic
        cdef Request *r
        cdef int n = 0
        cdef size_t reading = 0
        slow[0] = 0
        need[0] = 0
        while n < BATCH and reading < BATCH_READ:
            avail = self.inend - p
            if avail < HDR:
                need[0] = HDR - avail
                break
            r = &self.batch[n]
            memcpy(&magic, self.inbuf + p, 4)
            memcpy(&r.flags, self.inbuf + p + 4, 2)
            memcpy(&r.cmd, self.inbuf + p + 6, 2)
            memcpy(&r.cookie, self.inbuf + p + 8, 8)
            memcpy(&r.offset, self.inbuf + p + 16, 8)
            memcpy(&r.length, self.inbuf + p + 24, 4)
            r.flags = be16toh(r.flags)
            r.cmd = be16toh(r.cmd)
            r.offset = be64toh(r.offset)
            r.length = be32toh(r.length)
            if be32toh(magic) != REQUEST_MAGIC or not self.conn._eligible(r):
                slow[0] = 1
                break
            r.piped = 0
            self.conn.big_writes = r.cmd == CMD_WRITE and r.length >= SPLICE_MIN
            if r.cmd == CMD_WRITE:
                r.data = p + HDR
                if avail < HDR + <size_t>r.length:
                    if n == 0 and self.conn.big_writes and self._pipe_ready(HDR + r.length - avail):
                        r.piped = HDR + r.length - avail  # _pipe_in receives it
                        self.inpos = self.inend
                        return 1
                    need[0] = HDR + <size_t>r.length - avail
                    break
                p += HDR + r.length
            else:
                if r.cmd == CMD_READ:
                    reading += r.length
                p += HDR
            n += 1
            if self.conn.observed and (r.cmd == CMD_FLUSH or r.flags & FLAG_FUA):
                break  # its on_flush must follow every write before it, and nothing after
        self.inpos = p
        return n

    cdef int _receive(self, size_t need) noexcept nogil:
        """Read more: exactly NEED bytes' worth when the next request's size is known (so a big
        payload is never split with the next reader) or big WRITEs stream in (their payloads
        go through the pipe, not this buffer), else up to GREEDY_RECV. 1 when bytes came, else
        LOOP_CLOSED or LOOP_STOPPED."""
        cdef size_t want = need if need > HDR or self.conn.big_writes else GREEDY_RECV
        cdef ssize_t got
        cdef int rc
        if self.inpos > 0:
            if self.inend > self.inpos:
                memmove(self.inbuf, self.inbuf + self.inpos, self.inend - self.inpos)
            self.inend -= self.inpos
            self.inpos = 0
        if self.inend + want > self.incap and grow(&self.inbuf, &self.incap, self.inend + want) != 0:
            return -1
        while True:
            got = recv(self.conn.sock, self.inbuf + self.inend, want, MSG_DONTWAIT)
            if got > 0:
                self.inend += got
                return 1
            if got == 0:
                return LOOP_CLOSED
            if errno == EINTR:
                continue
            if errno != EAGAIN:
                return LOOP_CLOSED
            rc = self._wait_readable()
            if rc != 1:
                return rc

    cdef int _run(self) noexcept nogil:
        cdef int n, i, slow, rc, nwrites, allowed, w
        cdef bint keep
        cdef size_t need
        while True:
            if not self.holding and self._acquire() != 0:
                self._release()
                return LOOP_CLOSED
            while True:
                n = self._parse(&slow, &need)
                if n > 0 or slow:
                    break
                rc = self._receive(need)
                if rc != 1:
                    self.conn.closing = 1
                    self._release()
                    return -1 if rc < 0 else rc
            if n == 0:
                return LOOP_SLOW  # still holding: the request at the head is Python's
            if self.batch[0].piped:
                rc = self._pipe_in(&self.batch[0])
                if rc == 0:
                    continue  # the pipe filled up: the payload is in the buffer, parse it again
                if rc != 1:
                    self.conn.closing = 1
                    self._release()
                    return -1 if rc < 0 else rc
            nwrites = 0
            for i in range(n):
                if self.batch[i].cmd == CMD_WRITE:
                    nwrites += 1
            allowed = nwrites
            if nwrites and self.conn.observed:
                # before the next reader: one connection's batches reach the observers in order
                allowed = self._track(n, nwrites)
            keep = not slow and self._quick(n)
            self.kept = keep
            if not slow and not keep:
                self._release()  # another worker reads on while this one executes
            if nwrites and self.conn.tracker is not None and not self.conn.observed:
                allowed = self._track(n, nwrites)
            w = 0
            for i in range(n):
                if self._execute(&self.batch[i], w < allowed) < 0:
                    self._unorder()
                    if self.holding:
                        self._release()
                    return -1
                if self.batch[i].cmd == CMD_WRITE:
                    w += 1
            self._unorder()
            self._flush_out()
            if self.conn.closing:
                if self.holding:
                    self._release()
                return LOOP_CLOSED
            if slow:
                return LOOP_SLOW

    cdef bint _quick(self, int n) noexcept nogil:
        """Whether this worker keeps the receive lock while it runs its batch of N: when the
        batch took everything buffered and is READs only, each under SPLICE_MIN bytes (a few
        memcpys from the page cache). Then no other worker is woken only to wait in poll() for
        the next requests while this one is busy for microseconds: they are this worker's
        again (fewer wake-ups and less CPU a READ; 4k randread qd16, 2026-11-28). Writes never
        keep it: at queue depth 1 keeping it lowered the p50 but cost a third of the IOPS on a
        loaded machine (let go, it wakes the next reader while this one writes, so that one is
        running by the time the next request comes; kept, the one thread waits for a CPU again
        after every reply: docs/benchmarks.md). A kept READ tries the page cache alone first
        (preadv2 RWF_NOWAIT): what is not there lets the lock go before waiting for the disk,
        so cold reads are not served one at a time (`_execute`)."""
        cdef int i
        if self.inend != self.inpos:
            return False
        for i in range(n):
            if self.batch[i].cmd != CMD_READ or self.batch[i].length >= SPLICE_MIN:
                return False
        return True

    cdef bint _pipe_ready(self, size_t rest) noexcept nogil:
        """Whether REST bytes of a big WRITE's payload may go through the pipe (made on first
        use); observers need the payload in memory, so not with them."""
        cdef int fds[2]
        cdef int got
        if self.conn.observed or not self.conn.splice_ok or self.pipe_cap == <size_t>-1:
            return False
        if self.pipe_cap == 0:
            if pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0:
                self.pipe_cap = <size_t>-1
                return False
            self.pipe_fd[0], self.pipe_fd[1] = fds[0], fds[1]
            fcntl(fds[1], F_SETPIPE_SZ, <int>SPLICE_PIPE)
            got = fcntl(fds[1], F_GETPIPE_SZ)
            self.pipe_cap = <size_t>got if got > 0 else <size_t>-1
        # a pipe slot holds at most a page (on loopback a full one): with small network
        # segments the pipe may fill before the payload is in, and _pipe_in falls back
        return rest <= self.pipe_cap

    cdef void _drop_pipe(self) noexcept nogil:
        """Close the pipe and what it holds; the next big WRITE makes a new one."""
        if self.pipe_fd[0] >= 0:
            close(self.pipe_fd[0])
            close(self.pipe_fd[1])
            self.pipe_fd[0] = self.pipe_fd[1] = -1
            if self.pipe_cap != <size_t>-1:
                self.pipe_cap = 0

    cdef int _pipe_in(self, Request *r) noexcept nogil:
        """Move the rest of R's payload (R.piped bytes) from the socket into the pipe, with the
        receive lock held as for a payload read into the buffer: the volume is only touched
        once the whole request is in. 1 when it is; 0 when the pipe filled up first (small
        network segments): then what it holds is back in the buffer and the request is parsed
        again, to be received the usual way; else LOOP_CLOSED, LOOP_STOPPED or -1."""
        cdef size_t done = 0, start
        cdef ssize_t got
        cdef int rc
        while done < r.piped:
            rc = self._wait_readable()  # the socket blocks: never splice from it before data came
            if rc != 1:
                return rc
            got = splice(self.conn.sock, NULL, self.pipe_fd[1], NULL, r.piped - done,
                         SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if got > 0:
                done += got
            elif got == 0:
                return LOOP_CLOSED
            elif errno == EINTR:
                continue
            else:  # EAGAIN with data waiting: the pipe is full (or splice refused this socket)
                start = r.data + r.length - r.piped
                if start + r.piped > self.incap and grow(&self.inbuf, &self.incap, start + r.piped) != 0:
                    return -1
                if self._drain_pipe(self.inbuf + start, done) != 0:
                    return LOOP_CLOSED
                self._drop_pipe()
                if done == 0:
                    self.pipe_cap = <size_t>-1  # splice() refused this socket: no more tries
                self.inend = start + done
                self.inpos = r.data - HDR
                return 0
        return 1

    cdef int _drain_pipe(self, char *dest, size_t n) noexcept nogil:
        """Read N bytes the pipe holds into DEST; nonzero if it cannot."""
        cdef size_t done = 0
        cdef ssize_t got
        while done < n:
            got = read(self.pipe_fd[0], dest + done, n - done)
            if got > 0:
                done += got
            elif got < 0 and errno == EINTR:
                continue
            else:
                return 1
        return 0

    cdef uint32_t _pipe_out(self, Request *r) noexcept nogil:
        """Write the payload's tail that waits in the pipe; the NBD error, or 0."""
        cdef size_t tail = r.piped, done = 0
        cdef size_t start = r.data + r.length - tail
        cdef off_t off = r.offset + r.length - tail
        cdef ssize_t got
        while done < tail:
            got = splice(self.pipe_fd[0], NULL, self.conn.vol, &off, tail - done, SPLICE_F_MOVE)
            if got > 0:
                done += got
            elif got < 0 and errno == EINTR:
                continue
            elif got < 0 and errno == EINVAL and done == 0:
                # a volume that does not take splice(): its payloads come by recv from now on,
                # and this one is read back from the pipe and written as usual
                self.conn.splice_ok = 0
                if start + tail > self.incap and grow(&self.inbuf, &self.incap, start + tail) != 0:
                    return NBD_EIO
                if self._drain_pipe(self.inbuf + start, tail) != 0:
                    return NBD_EIO
                r.piped = 0
                while done < tail:
                    got = pwrite(self.conn.vol, self.inbuf + start + done, tail - done, off + done)
                    if got > 0:
                        done += got
                    elif got < 0 and errno == EINTR:
                        continue
                    else:
                        return nbd_errno(errno) if got < 0 else NBD_EIO
                return 0
            else:
                return nbd_errno(errno) if got < 0 else NBD_EIO
        return 0

    cdef int _wait_readable(self) noexcept nogil:
        """1 once the socket has data (or its end) to read, else LOOP_STOPPED, LOOP_CLOSED."""
        cdef pollfd pfd
        cdef int rc
        while True:
            if self.conn.stopping[0]:
                return LOOP_STOPPED
            if self.conn.closing:
                return LOOP_CLOSED
            pfd.fd = self.conn.sock
            pfd.events = POLLIN
            pfd.revents = 0
            rc = poll(&pfd, 1, POLL_MS)
            if rc > 0:
                return 1
            if rc < 0 and errno != EINTR:
                return LOOP_CLOSED

    cdef void _flush_out(self) noexcept nogil:
        if self.outlen:
            pthread_mutex_lock(&self.conn.send_lock)
            self.conn._send_all(self.outbuf, self.outlen)
            pthread_mutex_unlock(&self.conn.send_lock)
            self.outlen = 0

    cdef int _room(self, size_t n) noexcept nogil:
        """Make N bytes free at the end of the reply buffer. While the batch holds
        `tracker.ordering` the buffer grows instead of going out: a client that does not read
        its replies must not hold every other writer of the volume (and the fence) through a
        send under that lock (a batch's READs are bounded: BATCH_READ, or one request)."""
        if self.outlen + n <= self.outcap:
            return 0
        if self.ordered:
            return -1 if grow(&self.outbuf, &self.outcap, self.outlen + n) != 0 else 0
        self._flush_out()
        if n > self.outcap and grow(&self.outbuf, &self.outcap, n) != 0:
            return -1
        return 0

    cdef int _reply(self, Request *r, uint32_t error) noexcept nogil:
        """A reply without data: simple, or a structured NONE/ERROR chunk for a READ."""
        cdef char *q
        if self._room(32) != 0:
            return -1
        q = self.outbuf + self.outlen
        if self.conn.structured and (error or r.cmd == CMD_READ):
            put32(q, STRUCTURED_MAGIC)
            put16(q + 4, REPLY_FLAG_DONE)
            put16(q + 6, TYPE_ERROR if error else TYPE_NONE)
            memcpy(q + 8, &r.cookie, 8)
            if error:
                put32(q + 16, 6)
                put32(q + 20, error)
                put16(q + 24, 0)
                self.outlen += 26
            else:
                put32(q + 16, 0)
                self.outlen += 20
        else:
            put32(q, SIMPLE_MAGIC)
            put32(q + 4, error)
            memcpy(q + 8, &r.cookie, 8)
            self.outlen += 16
        return 0

    cdef int _execute(self, Request *r, bint may_write) noexcept nogil:
        cdef size_t head, done
        cdef ssize_t got
        cdef char *q
        cdef iovec iov
        cdef uint32_t error = 0
        if r.cmd == CMD_READ:
            head = 28 if self.conn.structured else 16
            if self._room(head + r.length) != 0:
                return -1
            q = self.outbuf + self.outlen
            done = 0
            if self.kept:
                iov.iov_base = q + head
                iov.iov_len = r.length
                got = preadv2(self.conn.vol, &iov, 1, r.offset, RWF_NOWAIT)
                if got > 0:
                    done = got
                if done < r.length:
                    self.kept = 0
                    self._release()  # not all in the page cache: the next worker reads on
            while done < r.length:
                got = pread(self.conn.vol, q + head + done, r.length - done, r.offset + done)
                if got > 0:
                    done += got
                elif got < 0 and errno == EINTR:
                    continue
                else:
                    error = nbd_errno(errno) if got < 0 else NBD_EIO
                    break
            if error:
                return self._reply(r, error)
            if self.conn.structured:
                put32(q, STRUCTURED_MAGIC)
                put16(q + 4, REPLY_FLAG_DONE)
                put16(q + 6, TYPE_OFFSET_DATA)
                memcpy(q + 8, &r.cookie, 8)
                put32(q + 16, r.length + 8)
                put64(q + 20, r.offset)
            else:
                put32(q, SIMPLE_MAGIC)
                put32(q + 4, 0)
                memcpy(q + 8, &r.cookie, 8)
            self.outlen += head + r.length
        elif r.cmd == CMD_WRITE:
            if not may_write:
                error = self.refused
            else:
                done = 0
                while done < r.length - r.piped:
                    got = pwrite(self.conn.vol, self.inbuf + r.data + done,
                                 r.length - r.piped - done, r.offset + done)
                    if got > 0:
                        done += got
                    elif got < 0 and errno == EINTR:
                        continue
                    else:
                        error = nbd_errno(errno) if got < 0 else NBD_EIO
                        break
                if not error and r.piped:
                    error = self._pipe_out(r)
                if not error and (r.flags & FLAG_FUA):
                    if fdatasync(self.conn.vol) != 0:
                        error = nbd_errno(errno)
                    elif self.conn.observed:
                        error = self._after_flush()  # a FUA is a flush to the observers too
            if r.piped and (error or not may_write):
                self._drop_pipe()  # whatever is left in it belongs to no request
            if self._reply(r, error) != 0:
                return -1
        else:  # CMD_FLUSH
            if fdatasync(self.conn.vol) != 0:
                error = nbd_errno(errno)
            elif self.conn.observed:
                error = self._after_flush()
            if self._reply(r, error) != 0:
                return -1
        if self.outlen >= SEND_EARLY and not self.ordered:  # (not under ordering: _room)
            self._flush_out()
        return 0

    cdef int _track(self, int n, int nwrites) noexcept nogil:
        """Mark the batch's writes before any is issued, and show them to the observers;
        returns how many of the batch's writes, from the first, may be issued (the rest fail
        with EIO). Writes into regions already in the activity log are marked right here,
        without the GIL, under the tracker's Mutex; otherwise the tracker logs the new regions
        durably first. This function holds no Python object: Cython would take the GIL at its
        exit to release them, on every batch (it did, until 2026-11-28)."""
        cdef bint logged = self._mark_logged(n)
        self.refused = NBD_EIO
        if logged and not self.conn.observed:
            return nwrites
        if self.conn.observed:
            # taken without the GIL and held into the GIL below: no deadlock, as every Python
            # taker (the fence, the live scrub, the Python loop) waits in Mutex.acquire with
            # the GIL released, and a Python holder may need the GIL to finish
            self.conn.t_ordering.lock()
            self.ordered = 1
        return self._track_python(n, nwrites, logged)

    cdef int _track_python(self, int n, int nwrites, bint logged) noexcept with gil:
        """_track's part in Python: log new regions (tracker.before_writes) and call the
        observers (with `tracker.ordering` held: _track took it, _unorder lets it go)."""
        cdef int allowed = nwrites
        cdef Request *r
        try:
            if not logged:
                offsets = []
                lengths = []
                for i in range(n):
                    if self.batch[i].cmd == CMD_WRITE:
                        offsets.append(self.batch[i].offset)
                        lengths.append(self.batch[i].length)
                self.conn.tracker.before_writes(offsets, lengths)
            if self.conn.observed:
                writes = []
                for i in range(n):
                    r = &self.batch[i]
                    if r.cmd == CMD_WRITE:
                        writes.append(
                            (r.offset, PyBytes_FromStringAndSize(self.inbuf + r.data, r.length))
                        )
                allowed, refusal = self.conn.tracker.observe_writes(writes)
                if refusal is not None:
                    self.refused = refusal_errno(refusal)
        except BaseException as exc:
            log.exception("write tracking failed; refusing the writes")
            self.refused = refusal_errno(exc)
            allowed = 0
        return allowed

    cdef void _unorder(self) noexcept nogil:
        """Let go of `tracker.ordering` once the batch's writes are on the volume (a native
        Mutex: no GIL round trip per batch, as a threading.Lock's release needed until
        2026-11-28)."""
        if self.ordered:
            self.ordered = 0
            self.conn.t_ordering.unlock()

    cdef uint32_t _after_flush(self) noexcept nogil:
        """After a FLUSH's (or FUA's) fdatasync, before its reply: the observers' on_flush,
        without the ordering lock (a `sync` replicator may wait there for the shadows)."""
        cdef uint32_t error = 0
        self._unorder()
        with gil:
            try:
                self.conn.tracker.after_flush()
            except BaseException as exc:
                log.error("a write observer failed at a flush: %s", exc)
                error = refusal_errno(exc)
        return error

    cdef bint _mark_logged(self, int n) noexcept nogil:
        """Without the GIL: mark the batch if every region it touches is logged already (else,
        or if marking fails, the tracker's before_writes does it with the GIL)."""
        cdef Request *r
        cdef uint64_t first, last, k
        cdef int i
        cdef bint logged = True
        self.conn.t_mutex.lock()
        for i in range(n):
            r = &self.batch[i]
            if r.cmd == CMD_WRITE:
                first = r.offset >> self.conn.t_shift
                last = (r.offset + r.length - 1) >> self.conn.t_shift
                if <Py_ssize_t>last >= self.conn.t_regions:
                    logged = False
                    break
                for k in range(first, last + 1):
                    if (self.conn.t_hot[k] == REGION_COLD or self.conn.t_hot[k] == REGION_PENDING
                            or self.conn.t_hot[k] == REGION_AHEAD):
                        logged = False
        if logged:
            for i in range(n):
                r = &self.batch[i]
                if r.cmd == CMD_WRITE:
                    first = r.offset >> self.conn.t_shift
                    last = (r.offset + r.length - 1) >> self.conn.t_shift
                    for k in range(first, last + 1):
                        self.conn.t_hot[k] = REGION_WRITTEN
                    if self.conn.t_bitmap.mark_range_nogil(r.offset, r.length) != 0:
                        logged = False
        self.conn.t_mutex.unlock()
        return logged
