"""A mutex that Python and GIL-free Cython code both take (shadowblk._native.mutex.Mutex).

A threading.Lock can only be taken with the GIL; this one lets the NBD loop mark the dirty
bitmap without the GIL while the tracker's checkpoint, in Python, takes the same lock.
Python waits for it with the GIL released, so a GIL-free holder is never blocked by a waiter.
"""

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)


cdef class Mutex:
    """Not reentrant; released by the thread that took it."""

    def __cinit__(self):
        pthread_mutex_init(&self.m, NULL)

    def __dealloc__(self):
        pthread_mutex_destroy(&self.m)

    cdef void lock(self) noexcept nogil:
        pthread_mutex_lock(&self.m)

    cdef void unlock(self) noexcept nogil:
        pthread_mutex_unlock(&self.m)

    def acquire(self) -> bool:
        if pthread_mutex_trylock(&self.m) != 0:
            with nogil:
                pthread_mutex_lock(&self.m)
        return True

    def release(self) -> None:
        pthread_mutex_unlock(&self.m)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        pthread_mutex_unlock(&self.m)
        return False
