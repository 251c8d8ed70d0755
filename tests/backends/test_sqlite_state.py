"""SqliteState: the embedded backend's accounts, sessions and deny lists, on a real file."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.backends.base import (
    RefreshUpdate,
    RotateOutcome,
    SessionRecord,
    TokenVerdict,
    UserRecord,
)
from chatd.backends.sqlite import state as sqlite_state
from chatd.backends.sqlite.state import SqliteState
from chatd.errors import BackendUnavailable, ConfigError

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "chatd.sqlite3"


@pytest.fixture
def state(db_path: Path, clock: Clock) -> Iterator[SqliteState]:
    s = SqliteState.open(db_path, clock=clock)
    yield s
    s.close()


def session(
    sid: str = "s_1", user: str = "alice", created: float = T0, **kw: object
) -> SessionRecord:
    fields: dict[str, object] = {
        "sid": sid,
        "user": user,
        "device": "laptop",
        "created_at": created,
        "expires_at": created + 3600,
        "refresh_hash": f"h-{sid}-0",
    }
    fields.update(kw)
    return SessionRecord(**fields)  # type: ignore[arg-type]


def update(new: str, at: float, n: int = 1) -> RefreshUpdate:
    return RefreshUpdate(new_hash=new, rotated_at=at, refreshes_today=n, day=int(at // 86400))


def count_rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as raw:
        return int(raw.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# --- opening ------------------------------------------------------------------------------------


async def test_the_database_is_created_private_and_survives_a_restart(
    db_path: Path, clock: Clock
) -> None:
    first = SqliteState.open(db_path, clock=clock)
    await first.put_user(UserRecord("alice", "hash", False, T0))
    first.close()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(db_path.parent).st_mode) == 0o700
    second = SqliteState.for_state_dir(db_path.parent, clock=clock)
    try:
        assert await second.get_user("alice") == UserRecord("alice", "hash", False, T0)
    finally:
        second.close()


async def test_the_cli_and_the_server_can_share_the_file(db_path: Path, clock: Clock) -> None:
    server = SqliteState.open(db_path, clock=clock)
    cli = SqliteState.open(db_path, clock=clock)
    try:
        await cli.put_user(UserRecord("bob", "h", False, T0))
        assert await server.get_user("bob") is not None
        await cli.set_disabled("bob", True)
        assert await server.token_verdict("bob", "j", None, T0) is TokenVerdict.DISABLED
    finally:
        cli.close()
        server.close()


def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "chatd.sqlite3"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="not a usable database"):
        SqliteState.open(bad)


def test_a_database_from_a_newer_chatd_is_refused(db_path: Path) -> None:
    SqliteState.open(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("PRAGMA user_version=99")
    with pytest.raises(ConfigError, match="newer chatd"):
        SqliteState.open(db_path)


def test_an_uncreatable_directory_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"server\.state_dir: cannot create"):
        SqliteState.open(tmp_path / "f" / "chatd.sqlite3")


async def test_a_locked_database_answers_backend_unavailable(
    db_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_state, "BUSY_TIMEOUT", 0.05)
    s = SqliteState.open(db_path, clock=clock)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(BackendUnavailable):
            await s.put_user(UserRecord("alice", "h"))
        blocker.execute("ROLLBACK")
        await s.put_user(UserRecord("alice", "h"))  # usable again afterwards
        assert await s.get_user("alice") is not None
    finally:
        blocker.close()
        s.close()


# --- users --------------------------------------------------------------------------------------


async def test_users_are_stored_listed_updated_and_deleted(state: SqliteState) -> None:
    await state.put_user(UserRecord("bob", "h1", False, T0))
    await state.put_user(UserRecord("alice", None, False, T0))
    assert [u.name for u in await state.list_users()] == ["alice", "bob"]
    await state.put_user(UserRecord("bob", "h2", False, T0))
    bob = await state.get_user("bob")
    assert bob is not None and bob.password_hash == "h2"
    assert await state.set_disabled("bob", True)
    bob = await state.get_user("bob")
    assert bob is not None and bob.disabled
    assert not await state.set_disabled("nobody", True)
    assert await state.delete_user("bob")
    assert not await state.delete_user("bob")
    assert await state.get_user("bob") is None


async def test_users_seen_with_any_token_are_known(state: SqliteState) -> None:
    assert not await state.user_known("carol")
    await state.note_seen("carol")
    await state.note_seen("carol")
    assert await state.user_known("carol")
    await state.put_user(UserRecord("dave"))
    assert await state.user_known("dave")


# --- sessions -----------------------------------------------------------------------------------


async def test_sessions_are_listed_oldest_first_and_hidden_once_expired(
    state: SqliteState, clock: Clock
) -> None:
    await state.create_session(session("s_b", created=T0 + 1))
    await state.create_session(session("s_a", created=T0))
    await state.create_session(session("s_x", user="bob"))
    assert [s.sid for s in await state.user_sessions("alice")] == ["s_a", "s_b"]
    assert await state.get_session("s_a") == session("s_a", created=T0)
    clock.now = T0 + 3600.5
    assert await state.get_session("s_a") is None
    assert [s.sid for s in await state.user_sessions("alice")] == ["s_b"]
    await state.delete_session("s_b")
    assert await state.user_sessions("alice") == []


async def test_rotation_replaces_the_current_hash_and_an_old_one_is_reuse(
    state: SqliteState, clock: Clock
) -> None:
    await state.create_session(session())
    assert (
        await state.rotate_refresh("s_1", "h-s_1-0", update("h1", T0 + 5), 0)
        is RotateOutcome.ROTATED
    )
    s = await state.get_session("s_1")
    assert s is not None
    assert (s.refresh_hash, s.live, s.spent, s.rotated_at, s.refreshes_today) == (
        "h1",
        (),
        (("h-s_1-0", T0 + 5),),
        T0 + 5,
        1,
    )
    assert (
        await state.rotate_refresh("s_1", "h-s_1-0", update("h2", T0 + 6), 0)
        is RotateOutcome.REUSED
    )
    # A hash the session never issued is not reuse: refused, nothing changes.
    assert (
        await state.rotate_refresh("s_1", "forged", update("h2", T0 + 6), 60)
        is RotateOutcome.UNKNOWN
    )
    assert (
        await state.rotate_refresh("s_nope", "h1", update("h2", T0 + 6), 0) is RotateOutcome.UNKNOWN
    )
    clock.now = T0 + 4000
    assert (
        await state.rotate_refresh("s_1", "h1", update("h2", T0 + 4000), 0) is RotateOutcome.UNKNOWN
    )


async def test_the_grace_window_rotates_the_previous_token_again_without_stretching(
    state: SqliteState,
) -> None:
    await state.create_session(session())
    assert (
        await state.rotate_refresh("s_1", "h-s_1-0", update("h1", T0 + 10), 5)
        is RotateOutcome.ROTATED
    )
    # The answer carrying h1 was lost; the client retries with the old token within 5 s.
    assert (
        await state.rotate_refresh("s_1", "h-s_1-0", update("h2", T0 + 14), 5)
        is RotateOutcome.ROTATED
    )
    s = await state.get_session("s_1")
    assert s is not None and (s.refresh_hash, s.live, s.spent, s.rotated_at) == (
        "h2",
        ("h1",),
        (("h-s_1-0", T0 + 10),),
        T0 + 10,
    )
    # The grace window counts from the first rotation, so it cannot be stretched.
    assert (
        await state.rotate_refresh("s_1", "h-s_1-0", update("h3", T0 + 16), 5)
        is RotateOutcome.REUSED
    )
    # h1 reached a second tab (or nobody): it keeps working, like h2.
    rotated = RotateOutcome.ROTATED
    rotated = RotateOutcome.ROTATED
    assert await state.rotate_refresh("s_1", "h1", update("h3", T0 + 14), 5) is rotated
    assert await state.rotate_refresh("s_1", "h2", update("h4", T0 + 15), 5) is rotated


# --- revocation ---------------------------------------------------------------------------------


async def test_token_verdicts_follow_the_deny_lists_and_the_disabled_flag(
    state: SqliteState, clock: Clock
) -> None:
    assert await state.token_verdict("alice", "j1", "s_1", T0) is TokenVerdict.OK
    await state.revoke_jti("j1", T0 + 100)
    assert await state.token_verdict("alice", "j1", None, T0) is TokenVerdict.REVOKED
    assert await state.token_verdict("alice", "j2", None, T0) is TokenVerdict.OK
    await state.revoke_session("s_1", T0 + 100)
    assert await state.token_verdict("alice", "j2", "s_1", T0) is TokenVerdict.REVOKED
    assert await state.token_verdict("alice", "j2", "s_2", T0) is TokenVerdict.OK
    await state.revoke_user_before("bob", T0 - 10, T0 + 100)
    assert await state.token_verdict("bob", "j3", None, T0 - 10.001) is TokenVerdict.REVOKED
    assert await state.token_verdict("bob", "j3", None, T0 - 10) is TokenVerdict.OK
    await state.put_user(UserRecord("bob", "h"))
    await state.set_disabled("bob", True)
    assert await state.token_verdict("bob", "j3", None, T0) is TokenVerdict.DISABLED
    clock.now = T0 + 100
    # Deny entries expire with the tokens they deny; the disabled flag does not.
    assert await state.token_verdict("alice", "j1", "s_1", T0) is TokenVerdict.OK
    assert await state.token_verdict("bob", "j3", None, T0 - 20) is TokenVerdict.DISABLED


async def test_revoking_a_user_again_keeps_the_widest_mark(
    state: SqliteState, clock: Clock
) -> None:
    await state.revoke_user_before("alice", T0 + 50, T0 + 1000)
    await state.revoke_user_before("alice", T0 + 10, T0 + 500)  # an older, narrower one
    assert await state.token_verdict("alice", "j", None, T0 + 40) is TokenVerdict.REVOKED
    clock.now = T0 + 999
    assert await state.token_verdict("alice", "j", None, T0 + 40) is TokenVerdict.REVOKED
    clock.now = T0 + 2000
    # The lapsed mark does not widen a new, later one.
    await state.revoke_user_before("alice", T0 + 5, T0 + 3000)
    assert await state.token_verdict("alice", "j", None, T0 + 40) is TokenVerdict.OK
    assert await state.token_verdict("alice", "j", None, T0 + 4) is TokenVerdict.REVOKED


async def test_expired_rows_are_purged_so_the_tables_never_grow_without_bound(
    state: SqliteState, db_path: Path, clock: Clock
) -> None:
    for i in range(300):
        await state.revoke_jti(f"j{i}", T0 + 10)
        await state.revoke_session(f"s_{i}", T0 + 10)
        await state.revoke_user_before(f"u{i}", T0, T0 + 10)
        await state.create_session(session(f"s_x{i}", created=T0 - 3590))
    assert count_rows(db_path, "deny_jti") == 300
    clock.now = T0 + sqlite_state.PURGE_INTERVAL + 1
    await state.revoke_jti("fresh", clock.now + 10)  # any write purges, at most once a minute
    for table, left in (("deny_jti", 1), ("deny_sid", 0), ("deny_user", 0), ("sessions", 0)):
        assert count_rows(db_path, table) == left, table
    clock.now += 20
    assert await state.purge() == 1
    assert count_rows(db_path, "deny_jti") == 0
