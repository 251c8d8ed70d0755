"""Attacks on the auth layer (issue 19) and its defects listed in issue 11, each reproduced."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import jwt
import pytest

from chatd.auth.keys import KeyRing
from chatd.auth.tokens import Claims, TokenVerifier
from chatd.codes import CloseCode
from chatd.errors import AuthError, CommandError
from tests.auth.conftest import SECRET
from tests.auth.test_accounts import World, refused


@pytest.fixture
async def w(tmp_path: Path, clock: Any, make_config: Any) -> Any:
    world = World(tmp_path, clock, make_config, refresh_reuse_grace=10.0)
    await world.add()
    yield world
    world.service.close()
    world.state.close()


async def test_a_forged_refresh_token_naming_a_real_session_has_no_side_effect(w: World) -> None:
    claims, extra = await w.login()
    assert claims.sid is not None
    err = await refused(w.accounts.refresh(f"{claims.sid}.{'A' * 43}"))
    assert (err.reason, err.code) == ("invalid refresh token", CloseCode.BAD_CREDENTIAL)
    assert w.events == []  # nobody was logged out
    assert await w.usable(extra["access_token"])
    _, again = await w.accounts.refresh(extra["refresh_token"])
    assert again["refresh_token"] != extra["refresh_token"]


async def test_two_tabs_sharing_a_refresh_token_both_end_up_with_working_tokens(
        w: World, clock: Any) -> None:
    _, extra = await w.login()
    shared = extra["refresh_token"]
    _, tab_a = await w.accounts.refresh(shared)
    clock.advance(1)
    _, tab_b = await w.accounts.refresh(shared)  # inside auth.refresh_reuse_grace
    clock.advance(120)
    _, tab_a2 = await w.accounts.refresh(tab_a["refresh_token"])
    _, tab_b2 = await w.accounts.refresh(tab_b["refresh_token"])
    assert w.events == []
    assert await w.usable(tab_a2["access_token"]) and await w.usable(tab_b2["access_token"])


async def test_simultaneous_logins_with_one_session_per_user_leave_exactly_one(
        tmp_path: Path, clock: Any, make_config: Any) -> None:
    w = World(tmp_path, clock, make_config, max_sessions_per_user=1)
    await w.add()
    try:
        (c1, _), (c2, _) = await asyncio.gather(w.login(), w.login())
        left = [s.sid for s in await w.state.user_sessions("alice")]
        assert len(left) == 1
        ended = [e.sid for e in w.events if e.code == CloseCode.REPLACED]
        assert sorted(left + ended) == sorted([c1.sid, c2.sid])
        loser = next(c for c in (c1, c2) if c.sid != left[0])
        # A socket of the replaced session that registers after the 4409 went out is refused.
        err = await refused(w.accounts.admit(loser))
        assert err.code == CloseCode.REVOKED
    finally:
        w.service.close()
        w.state.close()


async def test_logging_out_a_token_does_not_revoke_another_issuers_token_with_the_same_jti(
        w: World, clock: Any) -> None:
    now = clock()
    mallory = Claims(sub="mallory", jti="shared-jti", iat=now, exp=now + 60, iss="evil-idp")
    victim = Claims(sub="alice", jti="shared-jti", iat=now, exp=now + 60, iss="")
    await w.accounts.logout(mallory)
    await refused(w.accounts.admit(mallory))
    await w.accounts.admit(victim)


@pytest.mark.parametrize("jti", ["x" * 60_000, "a\r\nb", "", "sp ace"])
async def test_admin_revoke_jti_refuses_a_jti_chatd_would_never_accept(
        w: World, jti: str) -> None:
    with pytest.raises(CommandError, match="invalid jti"):
        await w.accounts.revoke_jti(jti, None)
    with pytest.raises(CommandError, match="invalid exp"):
        await w.accounts.revoke_jti("ok", 2.0**64)


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("value", [2**64, 2**63, 10**30, -1, 253_402_300_800])
def test_time_claims_out_of_range_are_refused(clock: Any, claim: str, value: int) -> None:
    ring, _ = KeyRing.from_config(_config(SECRET))
    payload: dict[str, Any] = {"sub": "alice", "jti": "j", "iat": int(clock()),
                               "exp": int(clock()) + 60, claim: value}
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    with pytest.raises(AuthError) as info:
        TokenVerifier(ring, leeway=30, clock=clock).verify(token)
    assert info.value.reason == f"invalid claim {claim}"


def _config(secret: str) -> Any:
    from chatd.config import AuthConfig, Config

    return Config(auth=AuthConfig(), jwt_secret=secret)
