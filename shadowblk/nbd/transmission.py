"""The transmission phase: requests in, replies out, every write tracked before it is issued.

Two loops share one request handler. On a plain socket WORKERS threads run the Cython loop
(`shadowblk._native.nbdloop`) on the same connection: it takes pipelined READ, WRITE and FLUSH
requests in batches, does them without the GIL and batches the replies (and hands each batch's
writes to the tracker's observers, if any, in one GIL acquisition); anything else (other
commands, bad requests) it hands back here, one request at a time. Over TLS the Python loop
runs every request. Validation always happens before the volume or the tracker is touched.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections.abc import Callable

from shadowblk.nbd import protocol as P
from shadowblk.nbd.handshake import Session
from shadowblk.nbd.wire import Disconnected, Wire
from shadowblk.tracking.tracker import WriteTracker

log = logging.getLogger(__name__)


MAX_STATUS_LENGTH = 1 << 30  # longest range one BLOCK_STATUS reply describes


class ProtocolViolation(Exception):
    """The client broke a MUST of the transmission phase: hard disconnect."""


def nbd_errno(exc: OSError) -> int:
    """The NBD error value for a failed system call."""
    return {
        errno.EPERM: P.EPERM,
        errno.EROFS: P.EPERM,
        errno.ENOSPC: P.ENOSPC,
        errno.EDQUOT: P.ENOSPC,
        errno.EFBIG: P.ENOSPC,
        errno.EINVAL: P.EINVAL,
        errno.ENOMEM: P.ENOMEM,
        errno.ESHUTDOWN: P.ESHUTDOWN,  # a fenced primary (shadowblk.nbd.fence)
    }.get(exc.errno or 0, P.EIO)


class RequestHandler:
    """Executes one request at a time and sends its reply."""

    def __init__(
        self,
        session: Session,
        tracker: WriteTracker | None,
        wire: Wire | None = None,
    ) -> None:
        self.session = session
        self.tracker = tracker
        self.wire = wire or session.wire
        self.backend = session.export.backend
        self.max_payload = session.export.max_payload

    # --- replies ---
    def _ok(self, cookie: int) -> None:
        if self.session.structured:
            self.wire.send(
                P.STRUCTURED_REPLY.pack(
                    P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, cookie, 0
                )
            )
        else:
            self.wire.send(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie))

    def _error(self, cookie: int, error: int, message: str) -> None:
        log.debug("request %#x failed with %d: %s", cookie, error, message)
        if self.session.structured:
            text = message.encode()[: P.MAX_STRING]
            payload = P.ERROR_CHUNK.pack(error, len(text)) + text
            head = P.STRUCTURED_REPLY.pack(
                P.STRUCTURED_REPLY_MAGIC,
                P.REPLY_FLAG_DONE,
                P.REPLY_TYPE_ERROR,
                cookie,
                len(payload),
            )
            self.wire.send(head + payload)
        else:
            self.wire.send(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, error, cookie))

    def _range_error(self, offset: int, length: int) -> str | None:
        if offset + length > self.backend.size:
            return f"range {offset}+{length} ends past the export size {self.backend.size}"
        return None

    # --- the dispatcher ---
    def handle(self, header: bytes, read_payload: Callable[[int], bytes]) -> bool:
        """Run the request whose 28-byte HEADER was read; False when the connection must end."""
        magic, flags, cmd, cookie, offset, length = P.REQUEST.unpack(header)
        if magic != P.REQUEST_MAGIC:
            raise ProtocolViolation(f"bad request magic {magic:#x}")
        if cmd == P.CMD_WRITE:
            if length > self.max_payload:
                raise ProtocolViolation(f"WRITE of {length} bytes, over the {self.max_payload} max")
            payload = read_payload(length)
            self._write(flags, cookie, offset, length, payload)
        elif cmd == P.CMD_DISC:
            return False
        elif cmd == P.CMD_READ:
            self._read(flags, cookie, offset, length)
        elif cmd == P.CMD_FLUSH:
            self._flush(flags, cookie)
        elif cmd == P.CMD_TRIM:
            self._trim(flags, cookie, offset, length)
        elif cmd == P.CMD_WRITE_ZEROES:
            self._zero(flags, cookie, offset, length)
        elif cmd == P.CMD_CACHE:
            self._cache(flags, cookie, offset, length)
        elif cmd == P.CMD_BLOCK_STATUS:
            self._block_status(flags, cookie, offset, length)
        else:
            self._error(cookie, P.EINVAL, f"unknown command {cmd}")
        return True

    def _check_flags(self, cookie: int, flags: int, allowed: int, name: str) -> bool:
        if flags & ~allowed:
            self._error(cookie, P.EINVAL, f"flags {flags:#x} not valid for {name}")
            return False
        return True

    def _observed(self) -> bool:
        return self.tracker is not None and bool(self.tracker.observers)

    def _ordered(self) -> contextlib.AbstractContextManager:
        """Held from tracking through the volume change while observers see the writes."""
        return self.tracker.ordering if self._observed() else contextlib.nullcontext()

    def _track(
        self, offset: int, length: int, data: bytes | None = None, trim: bool = False
    ) -> tuple[int, str] | None:
        """Mark the range dirty (and show it to the observers: DATA for a WRITE, else a zero or
        TRIM range) before it is written; a failure there (the fence's refusal too) is returned
        as (errno, message), for the caller to answer once it has let go of `_ordered()`: a
        client that does not read its replies must not hold the volume's other writers."""
        if self.tracker is None or length == 0:
            return None
        try:
            if data is not None:
                self.tracker.before_write(offset, data)
            else:
                self.tracker.before_zero(offset, length, trim)
        except Exception as exc:
            log.error("write tracking failed, refusing the write: %s", exc)
            error = nbd_errno(exc) if isinstance(exc, OSError) else P.EIO
            return error, f"write tracking failed: {exc}"
        return None

    def _durable(self, cookie: int, flags: int) -> bool:
        """FUA: the change is durable before the reply, on the volume and (a FUA is a flush to
        the observers too) wherever a `sync` replicator makes it durable."""
        if flags & P.CMD_FLAG_FUA:
            try:
                self.backend.flush()
                if self.tracker is not None:
                    self.tracker.after_flush()
            except Exception as exc:
                error = nbd_errno(exc) if isinstance(exc, OSError) else P.EIO
                self._error(cookie, error, f"flush failed: {exc}")
                return False
        return True

    def _write(self, flags: int, cookie: int, offset: int, length: int, payload: bytes) -> None:
        if self.backend.read_only:
            return self._error(cookie, P.EPERM, "the export is read-only")
        if not self._check_flags(cookie, flags, P.CMD_FLAG_FUA, "WRITE"):
            return None
        if (msg := self._range_error(offset, length)) is not None:
            return self._error(cookie, P.ENOSPC, msg)
        with self._ordered():  # failures are answered after it (_track)
            failed = self._track(offset, length, data=payload)
            if failed is None:
                try:
                    self.backend.pwrite(payload, offset)
                except OSError as exc:
                    failed = nbd_errno(exc), f"write failed: {exc}"
        if failed is not None:
            return self._error(cookie, *failed)
        if self._durable(cookie, flags):
            self._ok(cookie)
        return None

    def _read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        structured = self.session.structured
        allowed = P.CMD_FLAG_FUA | (P.CMD_FLAG_DF if structured else 0)
        if not self._check_flags(cookie, flags, allowed, "READ"):
            return None
        if length > self.max_payload:
            error = P.EOVERFLOW if structured else P.EINVAL
            return self._error(cookie, error, f"READ of {length} bytes, over the maximum")
        if (msg := self._range_error(offset, length)) is not None:
            return self._error(cookie, P.EINVAL, msg)
        try:
            data = self.backend.pread(offset, length) if length else b""
        except OSError as exc:
            return self._error(cookie, nbd_errno(exc), f"read failed: {exc}")
        if not structured:
            self.wire.send(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie) + data)
        elif not length:
            self._ok(cookie)
        else:
            head = P.STRUCTURED_REPLY.pack(
                P.STRUCTURED_REPLY_MAGIC,
                P.REPLY_FLAG_DONE,
                P.REPLY_TYPE_OFFSET_DATA,
                cookie,
                8 + length,
            )
            self.wire.send(head + P.U64.pack(offset) + data)
        return None

    def _flush(self, flags: int, cookie: int) -> None:
        if not self._check_flags(cookie, flags, P.CMD_FLAG_FUA, "FLUSH"):
            return
        try:
            self.backend.flush()
            if self.tracker is not None:
                self.tracker.after_flush()
        except Exception as exc:
            self._error(cookie, nbd_errno(exc) if isinstance(exc, OSError) else P.EIO, str(exc))
            return
        self._ok(cookie)

    def _trim(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if self.backend.read_only:
            return self._error(cookie, P.EPERM, "the export is read-only")
        if not self._check_flags(cookie, flags, P.CMD_FLAG_FUA, "TRIM"):
            return None
        if (msg := self._range_error(offset, length)) is not None:
            return self._error(cookie, P.EINVAL, msg)
        if length:
            with self._ordered():  # failures are answered after it (_track)
                failed = self._track(offset, length, trim=True)
                if failed is None:
                    try:
                        self.backend.trim(offset, length)
                    except OSError as exc:
                        failed = nbd_errno(exc), f"trim failed: {exc}"
            if failed is not None:
                return self._error(cookie, *failed)
        if self._durable(cookie, flags):
            self._ok(cookie)
        return None

    def _zero(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if self.backend.read_only:
            return self._error(cookie, P.EPERM, "the export is read-only")
        allowed = P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO
        if not self._check_flags(cookie, flags, allowed, "WRITE_ZEROES"):
            return None
        if (msg := self._range_error(offset, length)) is not None:
            return self._error(cookie, P.ENOSPC, msg)
        if length and flags & P.CMD_FLAG_FAST_ZERO and self._observed():
            # the observers must see the change before it is made, and a fast zero may turn
            # out impossible only then: refuse it up front (the client writes zeroes instead)
            return self._error(cookie, P.ENOTSUP, "no fast zero while replicating")
        if length:
            with self._ordered():  # failures are answered after it (_track)
                failed = self._track(offset, length)
                if failed is None:
                    try:
                        done = self.backend.zero(
                            offset,
                            length,
                            may_trim=not flags & P.CMD_FLAG_NO_HOLE,
                            fast_only=bool(flags & P.CMD_FLAG_FAST_ZERO),
                        )
                    except OSError as exc:
                        failed = nbd_errno(exc), f"write zeroes failed: {exc}"
                    else:
                        if not done:
                            failed = P.ENOTSUP, "no fast way to zero this range"
            if failed is not None:
                return self._error(cookie, *failed)
        if self._durable(cookie, flags):
            self._ok(cookie)
        return None

    def _cache(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if not self._check_flags(cookie, flags, 0, "CACHE"):
            return None
        if (msg := self._range_error(offset, length)) is not None:
            return self._error(cookie, P.EINVAL, msg)
        try:
            if length:
                self.backend.cache(offset, length)
        except OSError as exc:
            return self._error(cookie, nbd_errno(exc), f"cache failed: {exc}")
        self._ok(cookie)
        return None

    def _block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if not self.session.structured or not self.session.meta_contexts:
            return self._error(cookie, P.EINVAL, "no metadata context was negotiated")
        if not self._check_flags(cookie, flags, P.CMD_FLAG_REQ_ONE, "BLOCK_STATUS"):
            return None
        if length == 0:
            return self._error(cookie, P.EINVAL, "BLOCK_STATUS of zero length")
        if (msg := self._range_error(offset, length)) is not None:
            return self._error(cookie, P.EINVAL, msg)
        try:
            runs = self.backend.extents(offset, min(length, MAX_STATUS_LENGTH))
        except OSError as exc:
            return self._error(cookie, nbd_errno(exc), f"block status failed: {exc}")
        if flags & P.CMD_FLAG_REQ_ONE:
            runs = runs[:1]
        body = b"".join(
            P.EXTENT.pack(n, (P.STATE_HOLE | P.STATE_ZERO) if hole else 0) for n, hole in runs
        )
        for context_id in self.session.meta_contexts:
            payload = P.U32.pack(context_id) + body
            head = P.STRUCTURED_REPLY.pack(
                P.STRUCTURED_REPLY_MAGIC,
                P.REPLY_FLAG_DONE,
                P.REPLY_TYPE_BLOCK_STATUS,
                cookie,
                len(payload),
            )
            self.wire.send(head + payload)
        return None


class StopSignal:
    """Set once when the server stops: seen by the Python loops and, without the GIL, by the
    Cython loops between their poll() waits."""

    def __init__(self) -> None:
        self.event = threading.Event()
        module = _native_module()
        self.native = module.StopFlag() if module is not None else None

    def set(self) -> None:
        self.event.set()
        if self.native is not None:
            self.native.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def _serve_python(handler: RequestHandler, stopping: StopSignal) -> None:
    """Every request in Python: the TLS path, and the reference for the fast loop."""
    wire = handler.wire
    while True:
        while not wire.readable(0.2):
            if stopping.is_set():
                return
        header = wire.recv_exact(P.REQUEST.size)
        if not handler.handle(header, wire.recv_exact):
            return


WORKERS = 4  # threads per connection in the Cython loop: one receives while others do I/O


class _LockedWire:
    """The Python handler's side of a native connection: replies go through the connection's
    send lock, payload bytes come from the worker's buffer first."""

    def __init__(self, conn: object, worker: object, wire: Wire) -> None:
        self.conn, self.worker, self.wire = conn, worker, wire

    def send(self, data: bytes) -> None:
        try:
            self.conn.send(bytes(data))  # type: ignore[attr-defined]
        except ConnectionError as exc:
            raise Disconnected(str(exc)) from None

    def recv_exact(self, n: int) -> bytes:
        data = self.worker.take(n)  # type: ignore[attr-defined]
        return data + self.wire.recv_exact(n - len(data)) if len(data) < n else data


def _work(handler: RequestHandler, module: object, conn: object) -> None:
    """One worker thread: the Cython loop, and this module for what it hands back."""
    worker = module.Worker(conn)  # type: ignore[attr-defined]
    wire = _LockedWire(conn, worker, handler.wire)
    own = RequestHandler(handler.session, handler.tracker, wire=wire)
    try:
        while worker.run() == module.SLOW:  # type: ignore[attr-defined]
            if not own.handle(wire.recv_exact(P.REQUEST.size), wire.recv_exact):
                return
    finally:
        worker.release()  # ends the connection for the other workers too


def _serve_native(handler: RequestHandler, stopping: StopSignal, module: object) -> None:
    """WORKERS threads share the connection; the first failure ends them all."""
    session = handler.session
    export = session.export
    conn = module.Connection(  # type: ignore[attr-defined]
        session.wire.sock.fileno(),
        export.backend.fd,
        export.backend.size,
        export.max_payload,
        export.backend.read_only,
        session.structured,
        handler.tracker,
        stopping.native,
    )
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            _work(handler, module, conn)
        except BaseException as exc:
            errors.append(exc)

    helpers = [threading.Thread(target=guarded, daemon=True) for _ in range(WORKERS - 1)]
    for thread in helpers:
        thread.start()
    guarded()
    for thread in helpers:
        thread.join()
    if errors:
        raise errors[0]


def serve(
    session: Session,
    tracker: WriteTracker | None,
    stopping: StopSignal,
    native: bool = True,
) -> None:
    """Serve requests until the client disconnects or the server stops."""
    handler = RequestHandler(session, tracker)
    module = _native_module() if native and not session.wire.is_tls else None
    try:
        if module is None or stopping.native is None:
            _serve_python(handler, stopping)
        else:
            _serve_native(handler, stopping, module)
    except Disconnected as exc:
        log.info("client disconnected: %s", exc)


def _native_module() -> object | None:
    try:
        from shadowblk._native import nbdloop
    except ImportError:
        log.warning("shadowblk._native.nbdloop is not built; serving from Python")
        return None
    return nbdloop
