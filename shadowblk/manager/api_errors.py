"""Every failure of a request becomes one JSON body `{"error": ..., "detail": ...}` (I5).

Client mistakes are 4xx with a message that says what to fix; a store that cannot be reached
is a 503; anything else is a bug, logged with its traceback and answered with a 500 that does
not take the daemon down.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from etcd3gw.exceptions import Etcd3Exception

from shadowblk.manager.store import NotFound, StaleFence, StoreError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the manager refuses, with the HTTP status and what the client should know."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def error_response(status: int, error: str, detail: Any = None, **kw: Any) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status, **kw)


def _from_store(err: StoreError) -> ApiError:
    if isinstance(err, NotFound):
        return ApiError(404, str(err))
    if isinstance(err, StaleFence):
        return ApiError(503, f"this manager is no longer the leader: {err}")
    # GenerationConflict, DuplicateOrder, a taken name: the change lost against the fleet as it is
    return ApiError(409, str(err))


# what a store raises when it cannot be reached or is busy past its timeout
_UNAVAILABLE = (OSError, sqlite3.OperationalError, Etcd3Exception)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn whatever a handler raises into the JSON error body with the right status."""
    try:
        return await handler(request)
    except ApiError as err:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return error_response(err.status, err.error, err.detail, headers=headers)
    except StoreError as err:
        api = _from_store(err)
        return error_response(api.status, api.error, api.detail)
    except web.HTTPException as err:  # aiohttp's own: unknown route, wrong method, body too big
        if err.status < 400:
            raise
        headers = {k: v for k, v in err.headers.items() if k.lower() == "allow"}
        return error_response(err.status, err.reason, err.text, headers=headers)
    except _UNAVAILABLE as err:
        log.warning("store unavailable for %s %s: %r", request.method, request.path, err)
        return error_response(503, "the metadata store is unavailable, retry", repr(err))
    except Exception:
        log.exception("bug answering %s %s", request.method, request.path)
        return error_response(500, "internal error: see the manager's log")
