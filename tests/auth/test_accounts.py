"""Accounts: login, refresh rotation, logout, single-session policy, revocation, user admin.

Run against the real SqliteState in a temporary directory, with an injected clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import argon2
import pytest

from chatd.auth.accounts import Accounts, refresh_hash
from chatd.auth.keys import KeyRing
from chatd.auth.password_service import PasswordService
from chatd.auth.passwords import Passwords
from chatd.auth.tokens import Claims, TokenIssuer, TokenVerifier
from chatd.backends.base import CloseMatching, UserRecord
from chatd.backends.sqlite.state import SqliteState
from chatd.codes import CloseCode
from chatd.config import AuthConfig
from chatd.errors import AuthError, InvalidInput

T0 = 1_800_000_000.0
CHEAP = {"memory_cost": 1024, "time_cost": 1}
DAY = 86400.0


class World:
    """Everything one test needs: state, accounts, a verifier, and the published events."""

    def __init__(self, tmp_path: Path, clock: Any, make_config: Any, **auth: Any) -> None:
        self.clock = clock
        self.state = SqliteState.open(tmp_path / "chatd.sqlite3", clock=clock)
        ring, _ = KeyRing.from_config(make_config(jwt_secret="w" * 40))
        self.issuer = TokenIssuer(ring, clock=clock)
        self.verifier = TokenVerifier(ring, leeway=0, clock=clock)
        self.service = PasswordService(2, Passwords(**CHEAP))
        self.events: list[CloseMatching] = []
        self.auth = AuthConfig(**auth)
        self.accounts = Accounts(
            self.state,
            self.service,
            self.issuer,
            lambda: self.auth,
            publish=self._publish,
            clock=clock,
        )

    async def _publish(self, event: CloseMatching) -> None:
        self.events.append(event)

    async def add(self, name: str = "alice", password: str = "pw-alice") -> None:
        await self.accounts.add_user(name, password)

    async def login(
        self,
        name: str = "alice",
        password: str = "pw-alice",
        address: str = "10.0.0.1",
        device: str = "laptop",
    ) -> tuple[Claims, dict[str, Any]]:
        return await self.accounts.login(name, password, device, address)

    async def usable(self, access_token: str) -> bool:
        """Whether the access token passes verification and revocation, as at connect time."""
        claims = self.verifier.verify(access_token)
        try:
            await self.accounts.admit(claims)
        except AuthError:
            return False
        return True


@pytest.fixture
async def w(tmp_path: Path, clock: Any, make_config: Any) -> AsyncIterator[World]:
    world = World(tmp_path, clock, make_config)
    await world.add()
    yield world
    world.service.close()
    world.state.close()


async def refused(coro: Any) -> AuthError:
    with pytest.raises(AuthError) as info:
        await coro
    return info.value


# --- login --------------------------------------------------------------------------------------


async def test_login_opens_a_session_with_an_access_token_and_a_refresh_token(w: World) -> None:
    claims, extra = await w.login()
    assert claims.sub == "alice" and claims.sid is not None and claims.sid.startswith("s_")
    assert claims.exp == T0 + w.auth.access_ttl
    verified = w.verifier.verify(extra["access_token"])
    assert verified == claims
    assert extra["refresh_token"].startswith(claims.sid + ".")
    assert extra["refresh_expires_at"] == int(T0 + w.auth.refresh_ttl)
    session = await w.state.get_session(claims.sid)
    assert session is not None and session.user == "alice" and session.device == "laptop"
    # Only the hash is stored.
    assert session.refresh_hash == refresh_hash(extra["refresh_token"])
    assert extra["refresh_token"] not in session.refresh_hash


@pytest.mark.parametrize(
    ("name", "password"),
    [("alice", "wrong"), ("nobody", "pw-alice"), ("../etc/passwd", "x"), ("", "x")],
)
async def test_wrong_user_and_wrong_password_get_the_same_answer_after_hashing(
    w: World, name: str, password: str
) -> None:
    before = w.service.calls
    err = await refused(w.login(name, password))
    assert (err.reason, err.code, err.http_code) == (
        "invalid user name or password",
        CloseCode.BAD_CREDENTIAL,
        "unauthorized",
    )
    assert w.service.calls == before + 1  # the same work either way


async def test_an_account_without_password_cannot_log_in(w: World) -> None:
    await w.state.put_user(UserRecord("ext", None))
    err = await refused(w.login("ext", ""))
    assert err.reason == "invalid user name or password"


async def test_throttled_logins_per_user_are_refused_without_hashing(
    tmp_path: Path, clock: Any, make_config: Any
) -> None:
    w = World(tmp_path, clock, make_config, login_attempts_per_user=3, login_window=300)
    try:
        await w.add()
        for i in range(3):
            await refused(w.login(password="wrong", address=f"10.0.0.{i}"))
        calls = w.service.calls
        err = await refused(w.login(address="10.9.9.9"))  # even the right password
        assert (err.reason, err.code) == ("too many login attempts", CloseCode.RATE_ABUSED)
        assert w.service.calls == calls
        clock.advance(301)  # the window slides past the failures
        claims, _ = await w.login()
        assert claims.sub == "alice"
    finally:
        w.service.close()
        w.state.close()


async def test_throttled_logins_per_address_are_refused_without_hashing(
    tmp_path: Path, clock: Any, make_config: Any
) -> None:
    w = World(tmp_path, clock, make_config, login_attempts_per_address=3)
    try:
        await w.add()
        for name in ("u1", "u2", "u3"):
            await refused(w.login(name, "x", address="192.0.2.7"))
        calls = w.service.calls
        err = await refused(w.login(address="192.0.2.7"))
        assert err.code == CloseCode.RATE_ABUSED and w.service.calls == calls
        # Another address is not affected; an IPv6 /64 counts as one address.
        assert (await w.login(address="192.0.2.8"))[0].sub == "alice"
        for host in ("1", "2", "3"):
            await refused(w.login("u9", "x", address=f"2001:db8::{host}"))
        err = await refused(w.login(address="2001:db8::ffff"))
        assert err.code == CloseCode.RATE_ABUSED
    finally:
        w.service.close()
        w.state.close()


async def test_successful_logins_do_not_use_up_the_address_allowance(
    tmp_path: Path, clock: Any, make_config: Any
) -> None:
    w = World(tmp_path, clock, make_config, login_attempts_per_address=2, login_attempts_per_user=2)
    try:
        for i in range(5):
            await w.add(f"user{i}", "pw")
            await w.accounts.login(f"user{i}", "pw", "", "127.0.0.1")
        # A success also clears the name's failures.
        await refused(w.login("user0", "bad", address="10.1.1.1"))
        await w.accounts.login("user0", "pw", "", "10.1.1.2")
        await refused(w.login("user0", "bad", address="10.1.1.3"))
        await w.accounts.login("user0", "pw", "", "10.1.1.4")
    finally:
        w.service.close()
        w.state.close()


async def test_a_disabled_user_with_the_right_password_gets_4403_and_otherwise_4401(
    w: World,
) -> None:
    await w.accounts.disable_user("alice")
    err = await refused(w.login())
    assert (err.reason, err.code) == ("user disabled", CloseCode.USER_DISABLED)
    err = await refused(w.login(password="wrong"))
    assert err.code == CloseCode.BAD_CREDENTIAL  # no hint that the account exists


async def test_login_rehashes_when_the_parameters_have_risen(
    tmp_path: Path, clock: Any, make_config: Any
) -> None:
    w = World(tmp_path, clock, make_config)
    try:
        await w.add()  # CHEAP parameters
        old = await w.state.get_user("alice")
        assert old is not None and old.password_hash is not None
        stronger = PasswordService(1, Passwords(memory_cost=2048, time_cost=2))
        w.accounts.passwords = stronger
        await w.login()
        new = await w.state.get_user("alice")
        assert new is not None and new.password_hash is not None
        assert new.password_hash != old.password_hash
        params = argon2.extract_parameters(new.password_hash)
        assert (params.memory_cost, params.time_cost) == (2048, 2)
        await w.login()  # the new hash verifies
        stronger.close()
    finally:
        w.service.close()
        w.state.close()


# --- refresh ------------------------------------------------------------------------------------


async def test_refresh_rotates_both_tokens_and_the_old_refresh_token_stops_working(
    w: World, clock: Any
) -> None:
    claims1, extra1 = await w.login()
    clock.advance(60)
    claims2, extra2 = await w.accounts.refresh(extra1["refresh_token"])
    assert claims2.sid == claims1.sid and claims2.jti != claims1.jti
    assert claims2.exp == clock.now + w.auth.access_ttl
    assert extra2["refresh_token"] != extra1["refresh_token"]
    assert extra2["refresh_expires_at"] == extra1["refresh_expires_at"]  # the session's lifetime
    assert await w.usable(extra2["access_token"])
    claims3, _ = await w.accounts.refresh(extra2["refresh_token"], user="alice")
    assert claims3.sid == claims1.sid


async def test_a_reused_refresh_token_revokes_the_whole_session(w: World, clock: Any) -> None:
    claims, extra1 = await w.login()
    _, other_extra = await w.login()  # another session of the same user
    _, extra2 = await w.accounts.refresh(extra1["refresh_token"])
    clock.advance(1)
    err = await refused(w.accounts.refresh(extra1["refresh_token"]))
    assert (err.reason, err.code) == ("refresh token reused", CloseCode.REVOKED)
    assert w.events == [CloseMatching(CloseCode.REVOKED, "refresh token reused", sid=claims.sid)]
    # The legitimate holder's newer token is dead too, and so are the session's access tokens.
    err = await refused(w.accounts.refresh(extra2["refresh_token"]))
    assert err.reason == "invalid refresh token"
    assert not await w.usable(extra1["access_token"])
    assert not await w.usable(extra2["access_token"])
    # The other session is untouched.
    assert await w.usable(other_extra["access_token"])
    await w.accounts.refresh(other_extra["refresh_token"])


async def test_the_grace_window_lets_a_lost_answer_be_retried(
    tmp_path: Path, clock: Any, make_config: Any
) -> None:
    w = World(tmp_path, clock, make_config, refresh_reuse_grace=10)
    try:
        await w.add()
        _, extra1 = await w.login()
        await w.accounts.refresh(extra1["refresh_token"])  # this answer is "lost"
        clock.advance(5)
        _, extra3 = await w.accounts.refresh(extra1["refresh_token"])
        assert await w.usable(extra3["access_token"]) and w.events == []
        clock.advance(6)  # 11 s after the rotation: reuse again
        err = await refused(w.accounts.refresh(extra1["refresh_token"]))
        assert err.code == CloseCode.REVOKED
    finally:
        w.service.close()
        w.state.close()


async def test_refreshes_per_day_are_capped_and_then_the_session_must_log_in_again(
    tmp_path: Path, clock: Any, make_config: Any
) -> None:
    w = World(tmp_path, clock, make_config, max_refreshes_per_day=3)
    try:
        await w.add()
        _, extra = await w.login()
        token = extra["refresh_token"]
        for _ in range(3):
            token = (await w.accounts.refresh(token))[1]["refresh_token"]
        err = await refused(w.accounts.refresh(token))
        assert (err.reason, err.code) == ("too many refreshes, log in again", CloseCode.REVOKED)
        clock.advance(DAY)
        err = await refused(w.accounts.refresh(token))
        assert err.reason == "invalid refresh token"  # the session is gone, not paused
    finally:
        w.service.close()
        w.state.close()


async def test_the_refresh_count_starts_again_each_day(
    tmp_path: Path, clock: Any, make_config: Any
) -> None:
    w = World(tmp_path, clock, make_config, max_refreshes_per_day=2)
    try:
        await w.add()
        _, extra = await w.login()
        token = extra["refresh_token"]
        for _ in range(3):
            token = (await w.accounts.refresh(token))[1]["refresh_token"]
            token = (await w.accounts.refresh(token))[1]["refresh_token"]
            clock.advance(DAY)
    finally:
        w.service.close()
        w.state.close()


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "s_AAAAAAAAAAAAAAAAAAAAAA.BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",  # unknown session
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln",  # an access token is not one
        None,
    ],
)
async def test_unknown_and_malformed_refresh_tokens_are_refused(w: World, token: Any) -> None:
    err = await refused(w.accounts.refresh(token))
    assert (err.reason, err.code) == ("invalid refresh token", CloseCode.BAD_CREDENTIAL)
    assert w.events == []


async def test_an_access_token_of_a_session_is_not_a_refresh_token(w: World) -> None:
    _, extra = await w.login()
    err = await refused(w.accounts.refresh(extra["access_token"]))
    assert err.reason == "invalid refresh token"


async def test_a_session_ends_refresh_ttl_after_login(w: World, clock: Any) -> None:
    _, extra = await w.login()
    token = (await w.accounts.refresh(extra["refresh_token"]))[1]["refresh_token"]
    clock.advance(w.auth.refresh_ttl)
    err = await refused(w.accounts.refresh(token))
    assert err.reason == "invalid refresh token"


async def test_a_live_refresh_with_another_users_token_changes_nothing(w: World) -> None:
    _, extra = await w.login()
    err = await refused(w.accounts.refresh(extra["refresh_token"], user="bob"))
    assert err.reason == "refresh token of another user"
    await w.accounts.refresh(extra["refresh_token"], user="alice")  # still current


async def test_a_disabled_user_cannot_refresh_and_enabling_restores_the_session(w: World) -> None:
    _, extra = await w.login()
    await w.accounts.disable_user("alice")
    err = await refused(w.accounts.refresh(extra["refresh_token"]))
    assert err.code == CloseCode.USER_DISABLED
    assert await w.accounts.enable_user("alice")
    await w.accounts.refresh(extra["refresh_token"])


# --- logout -------------------------------------------------------------------------------------


async def test_logout_revokes_this_session_only(w: World) -> None:
    claims, extra = await w.login()
    _, other = await w.login()
    await w.accounts.logout(claims, conn_id="c1")
    assert w.events == [
        CloseMatching(CloseCode.REVOKED, "logged out", sid=claims.sid, except_conn="c1")
    ]
    assert not await w.usable(extra["access_token"])
    assert (await refused(w.accounts.refresh(extra["refresh_token"]))).reason == (
        "invalid refresh token"
    )
    assert await w.usable(other["access_token"])
    await w.accounts.refresh(other["refresh_token"])


async def test_logout_of_a_token_without_session_revokes_that_token(w: World) -> None:
    token, claims = w.issuer.issue("alice", 900)
    other, _ = w.issuer.issue("alice", 900)
    await w.accounts.logout(claims, conn_id="c9")
    assert w.events == [
        CloseMatching(CloseCode.REVOKED, "logged out", jti=claims.jti, except_conn="c9")
    ]
    assert not await w.usable(token)
    assert await w.usable(other)


async def test_logout_everywhere_revokes_every_session_and_token_of_the_user(
    w: World, clock: Any
) -> None:
    claims, extra = await w.login()
    _, extra2 = await w.login()
    external, _ = w.issuer.issue("alice", 900)
    await w.add("bob", "pw-bob")
    _, bob = await w.login("bob", "pw-bob")
    clock.advance(1)
    await w.accounts.logout(claims, everywhere=True, conn_id="c1")
    assert w.events == [
        CloseMatching(CloseCode.REVOKED, "logged out", user="alice", except_conn="c1")
    ]
    for token in (extra["access_token"], extra2["access_token"], external):
        assert not await w.usable(token)
    for refresh in (extra["refresh_token"], extra2["refresh_token"]):
        await refused(w.accounts.refresh(refresh))
    assert await w.usable(bob["access_token"])
    # Logging in again right away works: only tokens issued before the logout are refused.
    _, fresh = await w.login()
    assert await w.usable(fresh["access_token"])


# --- single-session policy ----------------------------------------------------------------------


async def test_with_one_session_per_user_a_new_login_replaces_the_old_one(
    tmp_path: Path, clock: Any, make_config: Any
) -> None:
    w = World(tmp_path, clock, make_config, max_sessions_per_user=1)
    try:
        await w.add()
        old, old_extra = await w.login(device="phone")
        clock.advance(1)
        new, new_extra = await w.login(device="laptop")
        assert w.events == [
            CloseMatching(CloseCode.REPLACED, "replaced by a newer login", sid=old.sid)
        ]
        await refused(w.accounts.refresh(old_extra["refresh_token"]))
        assert not await w.usable(old_extra["access_token"])
        assert await w.usable(new_extra["access_token"])
        assert [s.sid for s in await w.state.user_sessions("alice")] == [new.sid]
    finally:
        w.service.close()
        w.state.close()


async def test_with_two_sessions_per_user_the_oldest_goes_first(
    tmp_path: Path, clock: Any, make_config: Any
) -> None:
    w = World(tmp_path, clock, make_config, max_sessions_per_user=2)
    try:
        await w.add()
        sids = []
        for _ in range(3):
            sids.append((await w.login())[0].sid)
            clock.advance(1)
        assert [e.sid for e in w.events] == [sids[0]]
        assert {s.sid for s in await w.state.user_sessions("alice")} == set(sids[1:])
    finally:
        w.service.close()
        w.state.close()


async def test_unlimited_sessions_by_default(w: World) -> None:
    for _ in range(5):
        await w.login()
    assert len(await w.state.user_sessions("alice")) == 5 and w.events == []


# --- revocation and admin -----------------------------------------------------------------------


async def test_revoke_tokens_refuses_everything_issued_before_and_ends_sessions(
    w: World, clock: Any
) -> None:
    _, extra = await w.login()
    external, _ = w.issuer.issue("alice", 900)
    clock.advance(0.5)
    await w.accounts.revoke_tokens("alice")
    assert w.events == [CloseMatching(CloseCode.REVOKED, "tokens revoked", user="alice",
                                      issued_before=clock.now + w.auth.leeway)]
    assert not await w.usable(extra["access_token"])
    assert not await w.usable(external)
    await refused(w.accounts.refresh(extra["refresh_token"]))
    # A token without session is "issued before" up to the leeway after (iat may be skewed)...
    clock.advance(w.auth.leeway - 1)
    assert not await w.usable(w.issuer.issue("alice", 900)[0])
    clock.advance(2)  # iat is whole seconds, rounded down
    assert await w.usable(w.issuer.issue("alice", 900)[0])


async def test_revoke_jti_refuses_that_token_only(w: World) -> None:
    token, claims = w.issuer.issue("alice", 900)
    other, _ = w.issuer.issue("alice", 900)
    await w.accounts.revoke_jti(claims.jti, claims.exp)
    assert w.events == [CloseMatching(CloseCode.REVOKED, "token revoked", jti=claims.jti)]
    assert not await w.usable(token)
    assert await w.usable(other)


async def test_kick_closes_sockets_but_leaves_tokens_valid(w: World) -> None:
    token, _ = w.issuer.issue("alice", 900)
    await w.accounts.kick("alice")
    assert w.events == [CloseMatching(CloseCode.REVOKED, "kicked", user="alice")]
    assert await w.usable(token)


async def test_a_disabled_user_cannot_connect_and_enabling_undoes_it(w: World) -> None:
    token, claims = w.issuer.issue("alice", 900)
    await w.accounts.disable_user("alice")
    assert w.events == [CloseMatching(CloseCode.USER_DISABLED, "user disabled", user="alice")]
    err = await refused(w.accounts.admit(claims))
    assert (err.reason, err.code, err.http_code) == ("user disabled", 4403, "forbidden")
    assert await w.accounts.enable_user("alice")
    assert await w.usable(token)
    assert not await w.accounts.enable_user("nobody")


async def test_an_external_user_without_account_can_be_disabled(w: World) -> None:
    token, _ = w.issuer.issue("ext", 900)
    await w.accounts.disable_user("ext")
    assert not await w.usable(token)
    record = await w.state.get_user("ext")
    assert record is not None and record.disabled and record.password_hash is None
    with pytest.raises(InvalidInput):
        await w.accounts.disable_user("bad name")


async def test_admit_says_token_revoked_with_4410(w: World) -> None:
    _, claims = w.issuer.issue("alice", 900)
    await w.accounts.revoke_jti(claims.jti, claims.exp)
    err = await refused(w.accounts.admit(claims))
    assert (err.reason, err.code) == ("token revoked", CloseCode.REVOKED)


# --- user management ----------------------------------------------------------------------------


async def test_users_are_added_once_with_valid_names(w: World) -> None:
    with pytest.raises(InvalidInput, match="already exists"):
        await w.add()
    with pytest.raises(InvalidInput, match="invalid user name"):
        await w.add("no/slashes", "pw")
    with pytest.raises(InvalidInput):
        await w.add("bob", "")


async def test_changing_a_password_ends_the_sessions(w: World) -> None:
    claims, extra = await w.login()
    assert await w.accounts.set_password("alice", "new-pw")
    assert not await w.accounts.set_password("nobody", "x")
    assert w.events == [CloseMatching(CloseCode.REVOKED, "password changed", sid=claims.sid)]
    await refused(w.accounts.refresh(extra["refresh_token"]))
    await refused(w.login())
    assert (await w.login(password="new-pw"))[0].sub == "alice"


async def test_deleting_a_user_refuses_logins_and_tokens(w: World, clock: Any) -> None:
    _, extra = await w.login()
    clock.advance(1)
    assert await w.accounts.delete_user("alice")
    assert not await w.accounts.delete_user("alice")
    assert w.events[-1] == CloseMatching(CloseCode.REVOKED, "user deleted", user="alice")
    assert not await w.usable(extra["access_token"])
    await refused(w.accounts.refresh(extra["refresh_token"]))
    assert (await refused(w.login())).reason == "invalid user name or password"


async def test_a_reloaded_auth_config_applies_at_once(w: World) -> None:
    w.auth = dataclasses.replace(w.auth, access_ttl=60)
    claims, _ = await w.login()
    assert claims.exp == claims.iat + 60
