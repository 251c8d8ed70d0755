"""Accounts, sessions and revocations of the embedded backend, in ``<state_dir>/chatd.sqlite3``.

Why SQLite: users must survive restarts, ``chatd user add`` must work while the server runs
(another process writing the same file), and deny entries must expire by themselves. The stdlib
``sqlite3`` module in WAL mode gives all three with no extra dependency.

Every method is one short transaction on a local file, so the async methods call SQLite directly
instead of hopping to a thread: a look-up takes microseconds, far less than a thread hand-off.
Writers from other processes are waited for at most ``busy_timeout`` (2 s); past that the call
raises :class:`chatd.errors.BackendUnavailable` like any unreachable backend.

Deny entries (``deny_jti``, ``deny_sid``, ``deny_user``) carry ``until``; expired rows are ignored
at once and deleted by :meth:`SqliteState.purge`, which runs at most once a minute on writes, so
the tables never grow without bound. Expired sessions go the same way.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chatd.backends.base import (
    RefreshUpdate,
    RotateOutcome,
    SessionRecord,
    State,
    TokenVerdict,
    UserRecord,
)
from chatd.backends.sessions import (
    decode_live,
    decode_spent,
    encode_live,
    encode_spent,
    jti_key,
    rotate,
)
from chatd.errors import BackendUnavailable, ConfigError

DB_NAME = "chatd.sqlite3"
SCHEMA_VERSION = 2
PURGE_INTERVAL = 60.0
BUSY_TIMEOUT = 2.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    password_hash TEXT,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS seen (
    name TEXT PRIMARY KEY,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    refresh_hash TEXT NOT NULL,
    previous_hash TEXT,
    rotated_at REAL NOT NULL DEFAULT 0,
    refreshes_today INTEGER NOT NULL DEFAULT 0,
    day INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions(user);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions(expires_at);
CREATE TABLE IF NOT EXISTS deny_jti (jti TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE INDEX IF NOT EXISTS deny_jti_by_until ON deny_jti(until);
CREATE TABLE IF NOT EXISTS deny_sid (sid TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE INDEX IF NOT EXISTS deny_sid_by_until ON deny_sid(until);
CREATE TABLE IF NOT EXISTS deny_user (
    user TEXT PRIMARY KEY,
    issued_before REAL NOT NULL,
    until REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deny_user_by_until ON deny_user(until);
"""

#: Version 2: refresh-token branches and spent tokens (chatd.backends.sessions), the leeway of
#: a user's revocation mark. ``previous_hash`` becomes the first spent entry and stays unused.
_MIGRATE_2 = """
ALTER TABLE sessions ADD COLUMN live TEXT NOT NULL DEFAULT '';
ALTER TABLE sessions ADD COLUMN spent TEXT NOT NULL DEFAULT '';
UPDATE sessions SET spent = previous_hash || '@' || rotated_at WHERE previous_hash IS NOT NULL;
ALTER TABLE deny_user ADD COLUMN skew REAL NOT NULL DEFAULT 0;
"""

_SESSION_COLUMNS = (
    "sid, user, device, created_at, expires_at, refresh_hash, live, spent, rotated_at, "
    "refreshes_today, day"
)


def _session(row: Any) -> SessionRecord:
    sid, user, device, created, expires, current, live, spent, rotated, n, day = row
    return SessionRecord(sid, user, device, created, expires, current, decode_live(live),
                         decode_spent(spent), rotated, n, day)


def _session_row(r: SessionRecord) -> tuple[Any, ...]:
    return (r.sid, r.user, r.device, r.created_at, r.expires_at, r.refresh_hash,
            encode_live(r.live), encode_spent(r.spent), r.rotated_at, r.refreshes_today, r.day)


#: note_seen writes new names at least this often, or when this many are waiting.
SEEN_FLUSH_SECONDS = 1.0
SEEN_BATCH = 512
#: Names remembered as already written (then forgotten all at once: only a cache).
SEEN_CACHE = 100_000


class SqliteState(State):
    """:class:`chatd.backends.base.State` in one SQLite file.

    Create it with :meth:`open` (or :meth:`for_state_dir`); several processes may open the same
    file at once (the server and ``chatd user ...``).

    Args:
        conn: an open connection in autocommit mode (``isolation_level=None``).
        clock: unix seconds; decides which sessions and deny entries have expired.
    """

    def __init__(self, conn: sqlite3.Connection, *, clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._clock = clock
        self._lock = threading.Lock()
        self._last_purge = 0.0
        self.path = ""
        # note_seen runs on every authentication: remember who is already recorded and write
        # new names in batches, so a connection storm costs one transaction per batch, not one
        # blocking write per socket.
        self._seen: set[str] = set()
        self._unsaved: set[str] = set()
        self._last_seen_flush = 0.0

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> SqliteState:
        """Open (creating when missing, mode 0600 in a 0700 directory) the database at ``path``.

        Raises:
            ConfigError: the file cannot be created or opened, is not a chatd database, or was
                written by a newer chatd.
        """
        file = Path(path)
        try:
            file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Pre-create with 0600: the file holds password hashes, and SQLite gives its -wal
            # and -shm files the same permissions as the database.
            os.close(os.open(file, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise ConfigError("server.state_dir", f"cannot create {file}: {exc.strerror}") from None
        try:
            conn = sqlite3.connect(
                file, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise ConfigError("server.state_dir", f"cannot open {file}: {exc}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    "server.state_dir",
                    f"{file} was written by a newer chatd (schema {version} > {SCHEMA_VERSION})",
                )
            if version < SCHEMA_VERSION:
                # One transaction: a concurrent opener sees either no schema or all of it.
                conn.execute("BEGIN IMMEDIATE")
                # Read again inside the lock: another opener may have migrated meanwhile.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                script = (_SCHEMA if version < 1 else "") + (_MIGRATE_2 if version < 2 else "")
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigError(
                "server.state_dir", f"{file}: not a usable database ({exc})"
            ) from None
        except ConfigError:
            conn.close()
            raise
        state = cls(conn, clock=clock)
        state.path = str(file)
        return state

    @classmethod
    def for_state_dir(
        cls, state_dir: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> SqliteState:
        """:meth:`open` ``<state_dir>/chatd.sqlite3``."""
        return cls.open(Path(state_dir) / DB_NAME, clock=clock)

    def close(self) -> None:
        """Save pending "seen" marks and close the connection (idempotent)."""
        with contextlib.suppress(BackendUnavailable, sqlite3.ProgrammingError):
            self._flush_seen(self._clock())
        with self._lock:
            self._conn.close()

    # -- plumbing ----------------------------------------------------------------------------

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
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # the connection may be broken
                        self._conn.execute("ROLLBACK")
                raise BackendUnavailable(f"state database error: {exc}") from None

    def _after_write(self) -> None:
        now = self._clock()
        if now - self._last_purge >= PURGE_INTERVAL:
            self._last_purge = now
            self._purge(now)

    def _purge(self, now: float) -> int:
        with self._tx(write=True) as db:
            n = 0
            for table in ("deny_jti", "deny_sid", "deny_user"):
                n += db.execute(f"DELETE FROM {table} WHERE until <= ?", (now,)).rowcount
            n += db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount
            return n

    async def purge(self) -> int:
        """Delete expired deny entries and sessions now; returns how many rows went."""
        self._last_purge = self._clock()
        return self._purge(self._last_purge)

    # -- users -------------------------------------------------------------------------------

    async def get_user(self, name: str) -> UserRecord | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT name, password_hash, disabled, created_at FROM users WHERE name = ?",
                (name,),
            ).fetchone()
        return None if row is None else UserRecord(row[0], row[1], bool(row[2]), row[3])

    async def put_user(self, record: UserRecord) -> None:
        with self._tx(write=True) as db:
            db.execute(
                "INSERT INTO users (name, password_hash, disabled, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET password_hash = excluded.password_hash, "
                "disabled = excluded.disabled, created_at = excluded.created_at",
                (record.name, record.password_hash, int(record.disabled), record.created_at),
            )

    async def delete_user(self, name: str) -> bool:
        with self._tx(write=True) as db:
            return db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    async def list_users(self) -> list[UserRecord]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT name, password_hash, disabled, created_at FROM users ORDER BY name"
            ).fetchall()
        return [UserRecord(r[0], r[1], bool(r[2]), r[3]) for r in rows]

    async def note_seen(self, user: str) -> None:
        if user in self._seen:
            return
        self._unsaved.add(user)
        now = self._clock()
        if len(self._unsaved) >= SEEN_BATCH or now - self._last_seen_flush >= SEEN_FLUSH_SECONDS:
            self._flush_seen(now)

    def _flush_seen(self, now: float) -> None:
        self._last_seen_flush = now
        if not self._unsaved:
            return
        names = list(self._unsaved)
        with self._tx(write=True) as db:
            db.executemany(
                "INSERT INTO seen (name, at) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET at = excluded.at",
                [(name, now) for name in names],
            )
        self._unsaved.difference_update(names)
        if len(self._seen) > SEEN_CACHE:
            self._seen.clear()
        self._seen.update(names)

    async def user_known(self, user: str) -> bool:
        if user in self._seen or user in self._unsaved:
            return True
        with self._tx() as db:
            row = db.execute(
                "SELECT EXISTS(SELECT 1 FROM users WHERE name = ?) "
                "OR EXISTS(SELECT 1 FROM seen WHERE name = ?)",
                (user, user),
            ).fetchone()
        return bool(row[0])

    async def set_disabled(self, user: str, disabled: bool) -> bool:
        with self._tx(write=True) as db:
            n = db.execute(
                "UPDATE users SET disabled = ? WHERE name = ?", (int(disabled), user)
            ).rowcount
        return n > 0

    # -- sessions ----------------------------------------------------------------------------

    async def create_session(self, record: SessionRecord, limit: int = 0) -> list[str]:
        now = self._clock()
        with self._tx(write=True) as db:
            db.execute(
                f"INSERT OR REPLACE INTO sessions ({_SESSION_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _session_row(record),
            )
            ended: list[str] = []
            if limit > 0:
                rows = db.execute(
                    "SELECT sid FROM sessions WHERE user = ? AND expires_at > ? AND sid != ? "
                    "ORDER BY created_at DESC, sid DESC",
                    (record.user, now, record.sid),
                ).fetchall()
                ended = [r[0] for r in rows[limit - 1:]]
                db.executemany("DELETE FROM sessions WHERE sid = ?", [(e,) for e in ended])
        self._after_write()
        return ended

    async def get_session(self, sid: str) -> SessionRecord | None:
        """The session, or None when unknown or expired."""
        with self._tx() as db:
            row = db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE sid = ? AND expires_at > ?",
                (sid, self._clock()),
            ).fetchone()
        return None if row is None else _session(row)

    async def user_sessions(self, user: str) -> list[SessionRecord]:
        """The user's live sessions, oldest first."""
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user = ? AND expires_at > ? "
                "ORDER BY created_at, sid",
                (user, self._clock()),
            ).fetchall()
        return [_session(r) for r in rows]

    async def delete_session(self, sid: str) -> None:
        with self._tx(write=True) as db:
            db.execute("DELETE FROM sessions WHERE sid = ?", (sid,))

    async def rotate_refresh(
        self, sid: str, presented_hash: str, update: RefreshUpdate, grace: float
    ) -> RotateOutcome:
        """See :meth:`State.rotate_refresh` and :func:`chatd.backends.sessions.rotate`."""
        with self._tx(write=True) as db:
            row = db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE sid = ? AND expires_at > ?",
                (sid, self._clock()),
            ).fetchone()
            if row is None:
                return RotateOutcome.UNKNOWN
            outcome, record = rotate(_session(row), presented_hash, update, grace)
            if outcome is RotateOutcome.ROTATED:
                db.execute(
                    f"INSERT OR REPLACE INTO sessions ({_SESSION_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _session_row(record),
                )
            return outcome

    # -- revocation --------------------------------------------------------------------------

    async def revoke_jti(self, jti: str, until: float, *, issuer: str | None = None,
                         user: str | None = None) -> None:
        self._deny("deny_jti", "jti", jti_key(jti, issuer, user), until)

    async def revoke_session(self, sid: str, until: float) -> None:
        self._deny("deny_sid", "sid", sid, until)

    def _deny(self, table: str, column: str, value: str, until: float) -> None:
        with self._tx(write=True) as db:
            db.execute(
                f"INSERT INTO {table} ({column}, until) VALUES (?, ?) "
                f"ON CONFLICT({column}) DO UPDATE SET until = max(until, excluded.until)",
                (value, until),
            )
        self._after_write()

    async def revoke_user_before(self, user: str, issued_before: float, until: float, *,
                                 skew: float = 0.0) -> None:
        now = self._clock()
        with self._tx(write=True) as db:
            # An expired entry must not widen a new one: start afresh when it has lapsed.
            db.execute("DELETE FROM deny_user WHERE user = ? AND until <= ?", (user, now))
            db.execute(
                "INSERT INTO deny_user (user, issued_before, until, skew) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(user) DO UPDATE SET "
                "issued_before = max(issued_before, excluded.issued_before), "
                "until = max(until, excluded.until), skew = max(skew, excluded.skew)",
                (user, issued_before, until, skew),
            )
        self._after_write()

    async def token_verdict(self, user: str, jti: str, sid: str | None, iat: float,
                            issuer: str = "") -> TokenVerdict:
        now = self._clock()
        with self._tx() as db:
            row: Any = db.execute(
                "SELECT "
                "(SELECT disabled FROM users WHERE name = ?), "
                "EXISTS(SELECT 1 FROM deny_jti WHERE jti IN (?, ?) AND until > ?), "
                "EXISTS(SELECT 1 FROM deny_sid WHERE sid = ? AND until > ?), "
                "(SELECT issued_before FROM deny_user WHERE user = ? AND until > ? "
                " AND issued_before + skew > ?), "
                "(SELECT created_at FROM sessions WHERE sid = ? AND user = ? AND expires_at > ?)",
                (user, jti, jti_key(jti, issuer, user), now, sid or "", now, user, now, iat,
                 sid or "", user, now),
            ).fetchone()
        if row[0]:
            return TokenVerdict.DISABLED
        if row[1] or (sid is not None and row[2]):
            return TokenVerdict.REVOKED
        if row[3] is not None and not (sid is not None and row[4] is not None
                                       and row[4] >= row[3]):
            return TokenVerdict.REVOKED
        return TokenVerdict.OK
