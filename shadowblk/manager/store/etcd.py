"""The distributed store: etcd v3 through its JSON gateway, with etcd3gw as the client.

Every change that must not be lost to a race is one etcd transaction that compares what was
read (a key's mod_revision, or create_revision for "does not exist yet") before it writes:
volume generations (I3), fenced orders, and the leader key. etcd 3.4 (Debian 12) serves the
gateway on both /v3/ and /v3beta/; etcd3gw picks /v3/ from the server's /version.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from etcd3gw.client import Etcd3Client

from shadowblk.manager.store.interface import (
    DuplicateOrder,
    GenerationConflict,
    NotFound,
    StaleFence,
    StoreError,
)
from shadowblk.manager.store.model import Event, LeaderInfo, Server, Volume, switched


def b64(text: str | bytes) -> str:
    """etcd's gateway wants keys and values base64-encoded."""
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def compare(key: str, target: str, value: int | str) -> dict[str, Any]:
    """One txn comparison: TARGET is CREATE, MOD or VALUE; equality only (all we need)."""
    field = {"CREATE": "create_revision", "MOD": "mod_revision", "VALUE": "value"}[target]
    return {"key": b64(key), "result": "EQUAL", "target": target, field: value}


def put(key: str, value: str, lease: int | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease is not None:
        request["lease"] = lease
    return {"request_put": request}


def get(key: str) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def range_end(prefix: str) -> str:
    """The end of the key range that holds every key starting with PREFIX (ASCII prefixes)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def client_for(url: str, timeout_s: float = 5.0) -> Etcd3Client:
    """An etcd3gw client for an etcd://HOST:PORT or http://HOST:PORT url."""
    parts = urlsplit(url)
    return Etcd3Client(host=parts.hostname or "127.0.0.1", port=parts.port or 2379,
                       timeout=timeout_s)  # fmt: skip


class EtcdStore:
    """The Store contract over etcd (see interface.Store for each method's promise).

    Keys live under PREFIX: servers/NAME and volumes/NAME hold JSON documents,
    events/ID an event whose seq is its create_revision, orders/ORDER_ID marks an order
    given, and `leader` (attached to the leader's lease) names the leader.
    """

    def __init__(self, url: str, prefix: str = "/shadowblk/", timeout_s: float = 5.0) -> None:
        self.url = url
        self.client = client_for(url, timeout_s)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.leader_key = self.prefix + "leader"

    def _key(self, kind: str, name: str) -> str:
        if not name or "/" in name:
            raise StoreError(f"bad {kind} name {name!r}")
        return f"{self.prefix}{kind}/{name}"

    def _read(self, key: str) -> tuple[dict[str, Any], int] | None:
        """The JSON document at KEY and its mod_revision, or None."""
        found = self.client.get(key, metadata=True)
        if not found:
            return None
        value, meta = found[0]
        return json.loads(value), int(meta["mod_revision"])

    def _list(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(v) for v, _ in self.client.get_prefix(f"{self.prefix}{kind}/")]

    def _txn(self, compares: list, success: list, failure: list | None = None) -> dict:
        return dict(
            self.client.transaction(
                {"compare": compares, "success": success, "failure": failure or []}
            )
        )

    # servers
    def put_server(self, server: Server) -> None:
        self.client.put(self._key("servers", server.name), json.dumps(server.to_dict()))

    def get_server(self, name: str) -> Server:
        found = self._read(self._key("servers", name))
        if found is None:
            raise NotFound(f"no server {name!r}")
        return Server.from_dict(found[0])

    def list_servers(self) -> list[Server]:
        return sorted((Server.from_dict(d) for d in self._list("servers")), key=lambda s: s.name)

    def delete_server(self, name: str) -> None:
        if not self._delete(self._key("servers", name)):
            raise NotFound(f"no server {name!r}")

    def _delete(self, key: str) -> bool:
        reply = self.client.post(self.client.get_url("/kv/deleterange"), json={"key": b64(key)})
        return int(reply.get("deleted", 0)) > 0

    # volumes
    def create_volume(self, volume: Volume) -> None:
        key = self._key("volumes", volume.name)
        reply = self._txn([compare(key, "CREATE", 0)], [put(key, json.dumps(volume.to_dict()))])
        if not reply.get("succeeded"):
            raise StoreError(f"volume {volume.name!r} exists already")

    def _update_volume(self, name: str, change) -> tuple[Volume, Volume, dict | None]:
        """Read-compare-write loop on one volume: CHANGE(volume) returns (after, extra put or
        None) or raises; retried only when something else touched the volume in between."""
        key = self._key("volumes", name)
        while True:
            found = self._read(key)
            if found is None:
                raise NotFound(f"no volume {name!r}")
            before = Volume.from_dict(found[0])
            after, extra = change(before)
            success = [put(key, json.dumps(after.to_dict()))] + ([extra] if extra else [])
            reply = self._txn([compare(key, "MOD", found[1])], success)
            if reply.get("succeeded"):
                return before, after, reply

    def put_volume(self, volume: Volume) -> None:
        def keep_generation(current: Volume) -> tuple[Volume, None]:
            return Volume.from_dict({**volume.to_dict(), "generation": current.generation}), None

        self._update_volume(volume.name, keep_generation)

    def get_volume(self, name: str) -> Volume:
        found = self._read(self._key("volumes", name))
        if found is None:
            raise NotFound(f"no volume {name!r}")
        return Volume.from_dict(found[0])

    def list_volumes(self) -> list[Volume]:
        return sorted((Volume.from_dict(d) for d in self._list("volumes")), key=lambda v: v.name)

    def delete_volume(self, name: str) -> None:
        if not self._delete(self._key("volumes", name)):
            raise NotFound(f"no volume {name!r}")

    def set_volume_primary(self, name: str, new_primary: str, expected_generation: int) -> int:
        def switch(current: Volume) -> tuple[Volume, dict]:
            if current.generation != expected_generation:
                raise GenerationConflict(name, expected_generation, current.generation)
            after, event = switched(current, new_primary)
            return after, put(self._event_key(), json.dumps(event.to_dict()))

        _, after, _ = self._update_volume(name, switch)
        return after.generation

    # the event log
    def _event_key(self) -> str:
        return f"{self.prefix}events/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"

    def append_event(self, event: Event) -> int:
        if event.order_id is not None:
            raise StoreError("an order goes through give_order, with its fencing token")
        reply = self._txn([], [put(self._event_key(), json.dumps(event.to_dict()))])
        return int(reply["header"]["revision"])

    def give_order(self, event: Event) -> int:
        if event.order_id is None or event.fence is None:
            raise StoreError("an order needs an order_id and the leader's fence token")
        order_key = self._key("orders", event.order_id)
        event_key = self._event_key()
        reply = self._txn(
            [compare(self.leader_key, "CREATE", event.fence), compare(order_key, "CREATE", 0)],
            [put(order_key, event_key), put(event_key, json.dumps(event.to_dict()))],
            [get(self.leader_key), get(order_key)],
        )
        if reply.get("succeeded"):
            return int(reply["header"]["revision"])
        leader_kvs, order_kvs = (r["response_range"].get("kvs", []) for r in reply["responses"])
        current = self._leader_from(leader_kvs)
        if current is None or current.token != event.fence:
            raise StaleFence(event.fence, current)
        assert order_kvs, "the txn failed on neither comparison"
        raise DuplicateOrder(event.order_id)

    def events(self, since: int = 0) -> list[Event]:
        prefix = f"{self.prefix}events/"
        found = self.client.get(
            prefix,
            metadata=True,
            range_end=range_end(prefix),
            sort_order="ascend",
            sort_target="create",
            min_create_revision=since + 1,
        )
        return [
            Event.from_dict({**json.loads(v), "seq": int(meta["create_revision"])})
            for v, meta in found
        ]

    # leadership, as granted by EtcdElection (which owns the lease behind the leader key)
    @staticmethod
    def _leader_from(kvs: list[dict[str, Any]]) -> LeaderInfo | None:
        if not kvs:
            return None
        kv = kvs[0]
        return LeaderInfo(base64.b64decode(kv["value"]).decode(), int(kv["create_revision"]))

    def leader(self) -> LeaderInfo | None:
        reply = self.client.post(
            self.client.get_url("/kv/range"), json={"key": b64(self.leader_key)}
        )
        return self._leader_from(reply.get("kvs", []))

    def revision(self) -> int:
        reply = self.client.post(
            self.client.get_url("/kv/range"),
            json={
                "key": b64(self.prefix),
                "range_end": b64(range_end(self.prefix)),
                "count_only": True,
            },
        )
        return int(reply["header"]["revision"])

    def close(self) -> None:
        self.client.session.close()
