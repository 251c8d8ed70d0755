"""Rooms of the embedded backend (created rooms, member lists, bans, mutes) in SQLite.

The same file as the accounts (``<state_dir>/chatd.sqlite3``), through a connection of its own,
so rooms survive restarts and ``chatd room ...`` can change them while the server runs. The
tables are created here if missing (``CREATE TABLE IF NOT EXISTS``): they are independent of the
account schema's version.

A ban or mute is a row with ``until`` (NULL: until lifted); expired rows are ignored at once and
deleted on writes at most once a minute, like the deny entries of
:mod:`chatd.backends.sqlite.state`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from chatd.backends.base import RoomInfo, RoomMember, RoomStanding, RoomStore
from chatd.errors import BackendUnavailable, ConfigError

DB_NAME = "chatd.sqlite3"
PURGE_INTERVAL = 60.0
BUSY_TIMEOUT = 2.0
KINDS = ("ban", "mute")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS room_members (
    room TEXT NOT NULL,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    PRIMARY KEY (room, user)
);
CREATE TABLE IF NOT EXISTS room_restrictions (
    room TEXT NOT NULL,
    user TEXT NOT NULL,
    kind TEXT NOT NULL,
    until REAL,
    PRIMARY KEY (room, user, kind)
);
CREATE INDEX IF NOT EXISTS room_restrictions_by_until ON room_restrictions(until);
"""


class SqliteRooms(RoomStore):
    """:class:`~chatd.backends.base.RoomStore` in SQLite; create it with :meth:`open`.

    Args:
        conn: an open connection in autocommit mode.
        clock: unix seconds; decides which bans and mutes have ended.
    """

    def __init__(self, conn: sqlite3.Connection, *, clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._clock = clock
        self._lock = threading.Lock()
        self._last_purge = 0.0

    @classmethod
    def open(cls, path: str | os.PathLike[str], *,
             clock: Callable[[], float] = time.time) -> SqliteRooms:
        """Open the database at ``path`` (the accounts' file), adding the room tables.

        Raises:
            ConfigError: the file cannot be opened or is not a database.
        """
        file = Path(path)
        try:
            file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(file, os.O_RDWR | os.O_CREAT, 0o600))
            conn = sqlite3.connect(file, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
        except OSError as exc:
            raise ConfigError("server.state_dir", f"cannot create {file}: {exc.strerror}") from None
        except sqlite3.Error as exc:
            raise ConfigError("server.state_dir", f"cannot open {file}: {exc}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigError("server.state_dir",
                              f"{file}: not a usable database ({exc})") from None
        return cls(conn, clock=clock)

    @classmethod
    def for_state_dir(cls, state_dir: str | os.PathLike[str], *,
                      clock: Callable[[], float] = time.time) -> SqliteRooms:
        return cls.open(Path(state_dir) / DB_NAME, clock=clock)

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction; sqlite errors become BackendUnavailable (nothing was done)."""
        with self._lock:
            try:
                if write:
                    self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    if write and self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
                if write:
                    self._conn.execute("COMMIT")
                    self._maybe_purge()
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise BackendUnavailable(f"room database error: {exc}") from None

    def _maybe_purge(self) -> None:
        now = self._clock()
        if now - self._last_purge >= PURGE_INTERVAL:
            self._last_purge = now
            self._conn.execute("DELETE FROM room_restrictions WHERE until <= ?", (now,))

    # -- rooms -------------------------------------------------------------------------------

    async def create(self, room: str, owner: str | None) -> bool:
        with self._tx(write=True) as db:
            made = db.execute("INSERT OR IGNORE INTO rooms (name, created_at, owner) "
                              "VALUES (?, ?, ?)", (room, self._clock(), owner)).rowcount > 0
            if made and owner is not None:
                db.execute("INSERT INTO room_members (room, user, role) VALUES (?, ?, 'owner') "
                           "ON CONFLICT(room, user) DO UPDATE SET role = 'owner'", (room, owner))
        return made

    async def delete(self, room: str) -> bool:
        with self._tx(write=True) as db:
            existed = db.execute("DELETE FROM rooms WHERE name = ?", (room,)).rowcount > 0
            db.execute("DELETE FROM room_members WHERE room = ?", (room,))
            db.execute("DELETE FROM room_restrictions WHERE room = ?", (room,))
        return existed

    async def info(self, room: str) -> RoomInfo | None:
        with self._tx() as db:
            row = db.execute("SELECT name, created_at, owner FROM rooms WHERE name = ?",
                             (room,)).fetchone()
        return None if row is None else RoomInfo(*row)

    async def list_rooms(self, after: str | None, limit: int) -> list[RoomInfo]:
        with self._tx() as db:
            rows = db.execute("SELECT name, created_at, owner FROM rooms WHERE name > ? "
                              "ORDER BY name LIMIT ?", (after or "", max(limit, 0))).fetchall()
        return [RoomInfo(*row) for row in rows]

    # -- standing ----------------------------------------------------------------------------

    async def standing(self, room: str, user: str) -> RoomStanding:
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT EXISTS(SELECT 1 FROM rooms WHERE name = ?1), "
                "(SELECT role FROM room_members WHERE room = ?1 AND user = ?2), "
                "(SELECT coalesce(until, 'inf') FROM room_restrictions "
                " WHERE room = ?1 AND user = ?2 AND kind = 'ban' "
                "   AND (until IS NULL OR until > ?3)), "
                "(SELECT coalesce(until, 'inf') FROM room_restrictions "
                " WHERE room = ?1 AND user = ?2 AND kind = 'mute' "
                "   AND (until IS NULL OR until > ?3))",
                (room, user, now)).fetchone()
        return RoomStanding(exists=bool(row[0]), role=row[1], banned_until=_until(row[2]),
                            muted_until=_until(row[3]))

    # -- member list -------------------------------------------------------------------------

    async def set_role(self, room: str, user: str, role: str) -> None:
        with self._tx(write=True) as db:
            db.execute("INSERT INTO room_members (room, user, role) VALUES (?, ?, ?) "
                       "ON CONFLICT(room, user) DO UPDATE SET role = excluded.role",
                       (room, user, role))

    async def remove_member(self, room: str, user: str) -> bool:
        with self._tx(write=True) as db:
            return db.execute("DELETE FROM room_members WHERE room = ? AND user = ?",
                              (room, user)).rowcount > 0

    async def members(self, room: str, after: str | None, limit: int) -> list[RoomMember]:
        with self._tx() as db:
            rows = db.execute("SELECT user, role FROM room_members WHERE room = ? AND user > ? "
                              "ORDER BY user LIMIT ?", (room, after or "", max(limit, 0)))
            return [RoomMember(*row) for row in rows.fetchall()]

    # -- bans and mutes ----------------------------------------------------------------------

    async def restrict(self, room: str, user: str, kind: str, until: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown restriction {kind!r}")
        stored = None if math.isinf(until) else until
        with self._tx(write=True) as db:
            db.execute("INSERT INTO room_restrictions (room, user, kind, until) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT(room, user, kind) "
                       "DO UPDATE SET until = excluded.until", (room, user, kind, stored))

    async def lift(self, room: str, user: str, kind: str) -> bool:
        now = self._clock()
        with self._tx(write=True) as db:
            return db.execute("DELETE FROM room_restrictions WHERE room = ? AND user = ? "
                              "AND kind = ? AND (until IS NULL OR until > ?)",
                              (room, user, kind, now)).rowcount > 0


def _until(value: float | str | None) -> float | None:
    if value is None:
        return None
    return math.inf if value == "inf" else float(value)
