"""The embedded store: one SQLite file, safe for several processes on one host.

WAL lets readers go on while one writer commits; every write is a `BEGIN IMMEDIATE`
transaction (the write lock is taken up front, so two writers queue instead of failing half
way), and each one bumps the revision counter that followers poll.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shadowblk.manager.store.interface import (
    DuplicateOrder,
    GenerationConflict,
    NotFound,
    StaleFence,
    StoreError,
)
from shadowblk.manager.store.model import Event, LeaderInfo, Server, Volume, switched

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('leader_token', 0);
CREATE TABLE IF NOT EXISTS leader (id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT,
                                   token INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS servers (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (name TEXT PRIMARY KEY, generation INTEGER NOT NULL,
                                    doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                                   order_id TEXT UNIQUE, doc TEXT NOT NULL);
"""


class SqliteStore:
    """The Store contract over a SQLite file (see interface.Store for each method's promise)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that also bumps the revision; rolled back on any error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _one(self, sql: str, *args: object) -> tuple | None:
        return self._db.execute(sql, args).fetchone()

    # servers
    def put_server(self, server: Server) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO servers VALUES (?, ?)",
                (server.name, json.dumps(server.to_dict())),
            )

    def get_server(self, name: str) -> Server:
        row = self._one("SELECT doc FROM servers WHERE name = ?", name)
        if row is None:
            raise NotFound(f"no server {name!r}")
        return Server.from_dict(json.loads(row[0]))

    def list_servers(self) -> list[Server]:
        rows = self._db.execute("SELECT doc FROM servers ORDER BY name").fetchall()
        return [Server.from_dict(json.loads(r[0])) for r in rows]

    def delete_server(self, name: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM servers WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no server {name!r}")

    # volumes
    def create_volume(self, volume: Volume) -> None:
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO volumes VALUES (?, ?, ?)",
                    (volume.name, volume.generation, json.dumps(volume.to_dict())),
                )
        except sqlite3.IntegrityError:
            raise StoreError(f"volume {volume.name!r} exists already") from None

    def put_volume(self, volume: Volume) -> None:
        with self._write() as db:
            row = db.execute(
                "SELECT generation FROM volumes WHERE name = ?", (volume.name,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no volume {volume.name!r}")
            doc = {**volume.to_dict(), "generation": row[0]}
            db.execute("UPDATE volumes SET doc = ? WHERE name = ?", (json.dumps(doc), volume.name))

    def get_volume(self, name: str) -> Volume:
        row = self._one("SELECT doc FROM volumes WHERE name = ?", name)
        if row is None:
            raise NotFound(f"no volume {name!r}")
        return Volume.from_dict(json.loads(row[0]))

    def list_volumes(self) -> list[Volume]:
        rows = self._db.execute("SELECT doc FROM volumes ORDER BY name").fetchall()
        return [Volume.from_dict(json.loads(r[0])) for r in rows]

    def delete_volume(self, name: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM volumes WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no volume {name!r}")

    def set_volume_primary(self, name: str, new_primary: str, expected_generation: int) -> int:
        with self._write() as db:
            row = db.execute("SELECT doc FROM volumes WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no volume {name!r}")
            volume = Volume.from_dict(json.loads(row[0]))
            if volume.generation != expected_generation:
                raise GenerationConflict(name, expected_generation, volume.generation)
            after, event = switched(volume, new_primary)
            db.execute(
                "UPDATE volumes SET generation = ?, doc = ? WHERE name = ? AND generation = ?",
                (after.generation, json.dumps(after.to_dict()), name, expected_generation),
            )
            self._insert_event(db, event)
            return after.generation

    # the event log
    @staticmethod
    def _insert_event(db: sqlite3.Connection, event: Event) -> int:
        doc = json.dumps({**event.to_dict(), "seq": 0})
        cur = db.execute("INSERT INTO events (order_id, doc) VALUES (?, ?)", (event.order_id, doc))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def append_event(self, event: Event) -> int:
        if event.order_id is not None:
            raise StoreError("an order goes through give_order, with its fencing token")
        with self._write() as db:
            return self._insert_event(db, event)

    def give_order(self, event: Event) -> int:
        if event.order_id is None or event.fence is None:
            raise StoreError("an order needs an order_id and the leader's fence token")
        with self._write() as db:
            current = self._leader(db)
            if current is None or current.token != event.fence:
                raise StaleFence(event.fence, current)
            try:
                return self._insert_event(db, event)
            except sqlite3.IntegrityError:
                raise DuplicateOrder(event.order_id) from None

    def events(self, since: int = 0) -> list[Event]:
        rows = self._db.execute(
            "SELECT seq, doc FROM events WHERE seq > ? ORDER BY seq", (since,)
        ).fetchall()
        return [Event.from_dict({**json.loads(doc), "seq": seq}) for seq, doc in rows]

    # leadership, as granted by LockFileElection (which holds the exclusive lock file)
    @staticmethod
    def _leader(db: sqlite3.Connection) -> LeaderInfo | None:
        row = db.execute("SELECT holder, token FROM leader WHERE id = 1").fetchone()
        return LeaderInfo(row[0], row[1]) if row and row[0] is not None else None

    def leader(self) -> LeaderInfo | None:
        return self._leader(self._db)

    def claim_leadership(self, holder: str) -> int:
        """Record HOLDER as leader with a fresh, larger fencing token (only the lock holder)."""
        with self._write() as db:
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'leader_token'")
            (token,) = db.execute("SELECT value FROM meta WHERE key = 'leader_token'").fetchone()
            db.execute("INSERT OR REPLACE INTO leader VALUES (1, ?, ?)", (holder, token))
            return token

    def release_leadership(self, token: int) -> None:
        """Forget the leader if it is still the one with TOKEN."""
        with self._write() as db:
            db.execute("UPDATE leader SET holder = NULL WHERE id = 1 AND token = ?", (token,))

    def revision(self) -> int:
        row = self._one("SELECT value FROM meta WHERE key = 'revision'")
        assert row is not None
        return row[0]

    def close(self) -> None:
        self._db.close()
