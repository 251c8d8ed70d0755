"""Room tokens (``typ: room+jwt``) and the access token's ``rooms`` claim: the attack cases.

A room token is verified with the same keys and policy as an access token, and bound to the
connection's user and to the room being joined; ``typ`` keeps the two kinds apart both ways.
"""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from chatd.auth.keys import KeyRing
from chatd.auth.room_tokens import RoomTokenError, issue_room_token, verify_room_token
from chatd.auth.tokens import TokenIssuer, TokenVerifier
from chatd.config import KeySpec
from chatd.core.rooms import Grant
from chatd.errors import AuthError, InvalidInput
from tests.auth.conftest import PemPair
from tests.clock import Clock

SECRET = "k" * 40
OTHER = "o" * 40
T0 = 1_800_000_000.0
ROOM = "support:42"


@pytest.fixture
def ring(make_config: Any) -> KeyRing:
    ring, _ = KeyRing.from_config(make_config(jwt_secret=SECRET))
    return ring


@pytest.fixture
def verifier(ring: KeyRing, clock: Clock) -> TokenVerifier:
    return TokenVerifier(ring, leeway=30, clock=clock)


def room_claims(now: float = T0, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "room": ROOM, "iat": now, "exp": now + 300}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def sign(claims: dict[str, Any], key: Any = SECRET, alg: str = "HS256", **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers={"typ": "room+jwt", **headers})


def refused(verifier: TokenVerifier, clock: Clock, token: str, *, user: str = "alice",
            room: str = ROOM) -> str:
    with pytest.raises(RoomTokenError) as info:
        verify_room_token(verifier, token, user=user, room=room, clock=clock)
    err = info.value
    assert err.code == "forbidden"
    for part in token.split("."):
        if len(part) > 8:
            assert part not in err.message
    return err.reason


# -- happy paths --------------------------------------------------------------------------------


def test_an_issued_room_token_grants_its_room_to_its_user_with_its_role(
        ring: KeyRing, verifier: TokenVerifier, clock: Clock) -> None:
    token = issue_room_token(TokenIssuer(ring, clock=clock), "alice", ROOM, 300,
                             role="moderator", clock=clock)
    assert jwt.get_unverified_header(token)["typ"] == "room+jwt"
    grant = verify_room_token(verifier, token, user="alice", room=ROOM, clock=clock)
    assert grant == Grant(ROOM, "moderator", T0 + 300 + 30)


def test_a_room_token_without_role_grants_plain_access(verifier: TokenVerifier,
                                                       clock: Clock) -> None:
    grant = verify_room_token(verifier, sign(room_claims()), user="alice", room=ROOM,
                              clock=clock)
    assert grant.role is None


def test_a_room_token_from_a_configured_rsa_key_verifies(make_config: Any, rsa_pair: PemPair,
                                                         clock: Clock) -> None:
    spec = KeySpec(kid="app", alg="RS256", public_key_file=str(rsa_pair.public_file))
    ring, _ = KeyRing.from_config(make_config(spec))
    v = TokenVerifier(ring, leeway=30, clock=clock)
    token = sign(room_claims(), key=rsa_pair.private, alg="RS256", kid="app")
    assert verify_room_token(v, token, user="alice", room=ROOM, clock=clock).room == ROOM


# -- the attack cases ---------------------------------------------------------------------------


def test_a_room_token_with_a_wrong_signature_is_refused(verifier: TokenVerifier,
                                                        clock: Clock) -> None:
    assert refused(verifier, clock, sign(room_claims(), key=OTHER)) == "bad signature"


def test_a_room_token_of_another_user_is_refused(verifier: TokenVerifier, clock: Clock) -> None:
    assert refused(verifier, clock, sign(room_claims(sub="mallory"))) == \
        "token for another user"


def test_a_room_token_for_another_room_is_refused(verifier: TokenVerifier, clock: Clock) -> None:
    token = sign(room_claims(room="support:43"))
    assert refused(verifier, clock, token) == "token for another room"
    # A prefix of the room is no pattern here: room tokens name exactly one room.
    assert refused(verifier, clock, sign(room_claims(room="support:4")), room="support:42") == \
        "token for another room"


def test_an_expired_room_token_is_refused_after_the_leeway(verifier: TokenVerifier,
                                                           clock: Clock) -> None:
    token = sign(room_claims(exp=T0 - 29))
    assert verify_room_token(verifier, token, user="alice", room=ROOM, clock=clock)
    clock.advance(1)
    assert refused(verifier, clock, token) == "token expired"


def test_an_access_token_is_not_a_room_token(ring: KeyRing, verifier: TokenVerifier,
                                             clock: Clock) -> None:
    access, _ = TokenIssuer(ring, clock=clock).issue("alice", 900, rooms=(ROOM,))
    assert refused(verifier, clock, access) == "wrong token type"
    # Even with a room claim added and typ JWT, or no typ at all.
    assert refused(verifier, clock, jwt.encode(room_claims(), SECRET, algorithm="HS256",
                                               headers={"typ": "JWT"})) == "wrong token type"
    assert refused(verifier, clock, jwt.encode(room_claims(), SECRET,
                                               algorithm="HS256")) in ("wrong token type",)


def test_a_room_token_is_not_an_access_token(verifier: TokenVerifier) -> None:
    token = sign(room_claims(jti="j1"))
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert info.value.reason == "wrong token type"


def test_a_room_token_with_alg_none_or_an_unbound_algorithm_is_refused(
        verifier: TokenVerifier, clock: Clock) -> None:
    unsigned = jwt.encode(room_claims(), None, algorithm="none", headers={"typ": "room+jwt"})
    assert refused(verifier, clock, unsigned) == "algorithm not allowed"
    assert refused(verifier, clock, sign(room_claims(), key="k" * 64, alg="HS512")) == \
        "algorithm not allowed"


def test_a_room_token_with_an_unknown_kid_is_refused(verifier: TokenVerifier,
                                                     clock: Clock) -> None:
    assert refused(verifier, clock, sign(room_claims(), kid="nope")) == "unknown key"


@pytest.mark.parametrize("missing", ["sub", "room", "exp", "iat"])
def test_a_room_token_missing_a_required_claim_is_refused(
        verifier: TokenVerifier, clock: Clock, missing: str) -> None:
    assert refused(verifier, clock, sign(room_claims(**{missing: None}))) == \
        f"missing claim {missing}"


@pytest.mark.parametrize(("claims", "reason"), [
    ({"room": "bad room"}, "invalid claim room"), ({"room": 7}, "invalid claim room"),
    ({"role": "admin"}, "invalid claim role"), ({"role": 1}, "invalid claim role"),
    ({"exp": "soon"}, "invalid claim exp"), ({"iat": T0 + 100}, "token not yet valid"),
    ({"nbf": T0 + 100}, "token not yet valid"),
])
def test_a_room_token_with_a_bad_claim_is_refused(verifier: TokenVerifier, clock: Clock,
                                                  claims: dict[str, Any], reason: str) -> None:
    assert refused(verifier, clock, sign(room_claims(**claims))) == reason


def test_a_room_token_follows_the_configured_issuer_and_audience(ring: KeyRing,
                                                                 clock: Clock) -> None:
    v = TokenVerifier(ring, leeway=30, issuer="https://app", audience="chatd", clock=clock)
    assert refused(v, clock, sign(room_claims())) == "missing claim iss"
    assert refused(v, clock, sign(room_claims(iss="https://evil", aud="chatd"))) == \
        "wrong issuer"
    good = issue_room_token(TokenIssuer(ring, issuer="https://app", audience="chatd",
                                        clock=clock), "alice", ROOM, 60, clock=clock)
    assert verify_room_token(v, good, user="alice", room=ROOM, clock=clock).room == ROOM


def test_a_garbage_grant_is_refused_as_malformed(verifier: TokenVerifier, clock: Clock) -> None:
    for token in ("", "x", "a.b.c", "é" * 10, "x" * 9000):
        assert refused(verifier, clock, token) == "malformed token"


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"room": "bad room"}, "invalid room name"), ({"role": "admin"}, "role must be"),
    ({"ttl": 0}, "ttl must be positive"),
])
def test_issuing_a_bad_room_token_is_refused(ring: KeyRing, clock: Clock,
                                             kwargs: dict[str, Any], error: str) -> None:
    args: dict[str, Any] = {"room": ROOM, "ttl": 60, **kwargs}
    with pytest.raises(InvalidInput, match=error):
        issue_room_token(TokenIssuer(ring, clock=clock), "alice", args.pop("room"),
                         args.pop("ttl"), clock=clock, **args)


# -- the rooms claim of access tokens -----------------------------------------------------------


def test_the_rooms_claim_is_carried_by_issued_access_tokens(ring: KeyRing, verifier: TokenVerifier,
                                                            clock: Clock) -> None:
    token, issued = TokenIssuer(ring, clock=clock).issue("alice", 900,
                                                         rooms=("team:acme", "support:42*"))
    claims = verifier.verify(token)
    assert claims == issued and claims.rooms == ("team:acme", "support:42*")
    plain, _ = TokenIssuer(ring, clock=clock).issue("alice", 900)
    assert verifier.verify(plain).rooms == ()
    assert "rooms" not in jwt.decode(plain, options={"verify_signature": False})


@pytest.mark.parametrize("value", ["team:acme", [1], ["bad room"], ["a*b"], {"a": 1}])
def test_an_access_token_with_a_malformed_rooms_claim_is_refused(
        verifier: TokenVerifier, value: object) -> None:
    claims = {"sub": "alice", "iat": T0, "exp": T0 + 900, "jti": "j1", "rooms": value}
    with pytest.raises(AuthError) as info:
        verifier.verify(jwt.encode(claims, SECRET, algorithm="HS256"))
    assert info.value.reason == "invalid claim rooms"


def test_issuing_an_access_token_with_bad_rooms_is_refused(ring: KeyRing, clock: Clock) -> None:
    with pytest.raises(InvalidInput, match="rooms"):
        TokenIssuer(ring, clock=clock).issue("alice", 900, rooms=("no spaces",))


