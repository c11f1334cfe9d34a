# A pthread mutex shared by Python and GIL-free Cython code (the tracker's lock, taken by the
# NBD hot loop without the GIL). Rule that keeps it deadlock-free: nobody waits for it while
# holding the GIL; Python holders may take the GIL back, GIL-free holders never ask for it.

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass


cdef class Mutex:
    cdef pthread_mutex_t m

    cdef void lock(self) noexcept nogil
    cdef void unlock(self) noexcept nogil
