"""A small synchronous client of the manager's HTTP API, for the CLI, agents and attach.

Standard library only (urllib), so that every role can use it without an event loop; an
asyncio caller runs it in a thread. A standby's 503 names the leader: the client repeats the
request there once, so any manager's URL works for changes. Given several managers' URLs
(comma-separated), it tries them in turn when one does not answer, starting with the last one
that did: an agent keeps heartbeating through the death of the manager it was talking to.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any


class ManagerError(Exception):
    """The manager refused a request: its status, message and details."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(f"{error} (HTTP {status})" if status else error)
        self.status, self.error, self.detail = status, error, detail


class Unreachable(ManagerError):
    """No answer from the manager at all."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(0, f"cannot reach the manager at {url}: {reason}")


def manager_urls(text: str) -> list[str]:
    """The managers' URLs in a comma-separated list, each checked."""
    urls = [u.strip().rstrip("/") for u in text.split(",") if u.strip()]
    if not urls:
        raise ManagerError(0, "no manager URL given")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ManagerError(0, f"the manager URL must be http://HOST:PORT, not {url!r}")
    return urls


class Client:
    """Calls on the managers (and their leader, when the one answering is a standby)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 10.0) -> None:
        self.urls = manager_urls(url)
        self.token, self.timeout_s = token, timeout_s

    @property
    def url(self) -> str:
        """The manager that answered last (the first one given, before any call)."""
        return self.urls[0]

    def _any(self, method: str, path: str, body: Any) -> tuple[str, int, Any]:
        """The first answer of the managers, tried from the last one that answered."""
        failure: Unreachable | None = None
        for i, base in enumerate(list(self.urls)):
            try:
                status, doc = self._once(base, method, path, body)
            except Unreachable as err:
                failure = err
                continue
            if i:
                self.urls.insert(0, self.urls.pop(i))
            return base, status, doc
        assert failure is not None
        raise failure

    def _once(self, base: str, method: str, path: str, body: Any) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return reply.status, json.load(reply)
        except urllib.error.HTTPError as err:
            with err:
                raw = err.read()
            try:
                doc = json.loads(raw)
                return err.code, doc if isinstance(doc, dict) else {"error": str(doc)}
            except ValueError:
                return err.code, {"error": raw.decode(errors="replace")[:200] or err.reason}
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise Unreachable(base, str(reason)) from None
        except ValueError as err:
            raise ManagerError(0, f"the manager at {base} did not answer JSON: {err}") from None

    def call(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        """METHOD PATH with a JSON BODY; the answer's JSON, or ManagerError."""
        params = {k: v for k, v in query.items() if v is not None}
        if params:
            path += "?" + urllib.parse.urlencode(params)
        base, status, doc = self._any(method, path, body)
        leader = (doc.get("detail") or {}) if status == 503 and isinstance(doc, dict) else {}
        if isinstance(leader, dict) and leader.get("leader") not in (None, base):
            status, doc = self._once(leader["leader"].rstrip("/"), method, path, body)
        if status >= 400:
            raise ManagerError(status, doc.get("error", "unknown error"), doc.get("detail"))
        return doc

    def stream(self, method: str, path: str, body: Any = None) -> Iterator[dict[str, Any]]:
        """METHOD PATH whose answer is JSON lines (a scrub's progress, then its report): each
        line as it comes. Refusals are ManagerError, as for call(); once the answer started,
        reads wait as long as the work takes (a shadow's pass sends nothing for a while)."""
        failure: Unreachable | None = None
        for base in list(self.urls):
            try:
                status, reply = self._open(base, method, path, body)
                break
            except Unreachable as err:
                failure = err
        else:
            assert failure is not None
            raise failure
        leader = (reply.get("detail") or {}) if status == 503 and isinstance(reply, dict) else {}
        if isinstance(leader, dict) and leader.get("leader") not in (None, base):
            base = leader["leader"].rstrip("/")
            status, reply = self._open(base, method, path, body)
        if isinstance(reply, dict):
            raise ManagerError(status, reply.get("error", "unknown error"), reply.get("detail"))
        with reply:
            try:
                for line in reply:
                    yield json.loads(line)
            except ValueError:
                raise ManagerError(
                    0, f"the manager at {base} sent a line that is not JSON"
                ) from None
            except (OSError, http.client.HTTPException) as err:
                raise Unreachable(base, f"the answer broke off: {err}") from None

    def _open(self, base: str, method: str, path: str, body: Any) -> tuple[int, Any]:
        """The status and the open answer (200), or the status and the error document."""
        parts = urllib.parse.urlsplit(base)
        kind = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        conn = kind(parts.hostname or "", parts.port, timeout=self.timeout_s)
        headers = {"Accept": "application/x-ndjson", "Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, json.dumps(body or {}).encode(), headers)
            reply = conn.getresponse()
            if reply.status == 200:
                assert conn.sock is not None
                conn.sock.settimeout(None)
                return 200, reply
            raw = reply.read()
        except OSError as err:
            conn.close()
            raise Unreachable(base, str(err)) from None
        conn.close()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            doc = {"error": raw.decode(errors="replace")[:200] or reply.reason}
        return reply.status, doc

    # servers (register and heartbeat are the agent's protocol)
    def servers(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/servers")["servers"]

    def server(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/servers/{_quote(name)}")

    def register(self, **server: Any) -> dict[str, Any]:
        return self.call("POST", "/v1/servers", server)

    def heartbeat(self, name: str, **health: Any) -> dict[str, Any]:
        return self.call("POST", f"/v1/servers/{_quote(name)}/heartbeat", health)

    # volumes
    def volumes(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/volumes")["volumes"]

    def volume(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/volumes/{_quote(name)}")

    def create_volume(self, **spec: Any) -> dict[str, Any]:
        return self.call("POST", "/v1/volumes", {k: v for k, v in spec.items() if v is not None})

    def delete_volume(self, name: str) -> dict[str, Any]:
        return self.call("DELETE", f"/v1/volumes/{_quote(name)}")

    def unblock(self, name: str) -> dict[str, Any]:
        return self.call("POST", f"/v1/volumes/{_quote(name)}/unblock")

    def placement(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/volumes/{_quote(name)}/placement")

    def scrub(self, name: str, repair: bool, rate: float | None) -> Iterator[dict[str, Any]]:
        """The live scrub of NAME (RATE in bytes/s): progress lines, then its report."""
        body = {"repair": repair, "rate": rate}
        return self.stream("POST", f"/v1/volumes/{_quote(name)}/scrub", body)

    # the fleet
    def status(self) -> dict[str, Any]:
        return self.call("GET", "/v1/status")

    def events(self, since: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/events", since=since, limit=limit)["events"]


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")
