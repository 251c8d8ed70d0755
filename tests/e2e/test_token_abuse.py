"""The token attack matrix of the token-lifecycle issue, against a two-node cluster: every forged
or misused credential is refused on every node, at the handshake and as a first frame."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable

import jwt
import orjson
import pytest
from websockets.exceptions import InvalidStatus

from tests.client import Client
from tests.e2e.conftest import Cluster
from tests.nodes import SECRET, issue


def claims(**extra: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 600, "jti": uuid.uuid4().hex, **extra}


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()


def alg_none(casing: str) -> str:
    return f"{b64({'alg': casing, 'typ': 'JWT'})}.{b64(claims())}."


def tampered() -> str:
    head, _, sig = issue("alice").split(".")
    return f"{head}.{b64(claims(sub='root', role='admin'))}.{sig}"


FORGERIES: dict[str, Callable[[], str]] = {
    "alg none": lambda: alg_none("none"),
    "alg NoNe": lambda: alg_none("NoNe"),
    "wrong secret": lambda: jwt.encode(claims(), "x" * 40, algorithm="HS256"),
    "unknown kid": lambda: jwt.encode(claims(), SECRET, algorithm="HS256",
                                      headers={"kid": "other"}),
    "kid with a path": lambda: jwt.encode(claims(), SECRET, algorithm="HS256",
                                          headers={"kid": "../../etc/passwd"}),
    "jku pointing elsewhere, wrong key": lambda: jwt.encode(
        claims(), "y" * 40, algorithm="HS256", headers={"jku": "http://127.0.0.1:1/jwks"}),
    "tampered payload": tampered,
    "refresh-typed token": lambda: jwt.encode(claims(), SECRET, algorithm="HS256",
                                              headers={"typ": "refresh+jwt"}),
    "expired": lambda: jwt.encode(claims(exp=int(time.time()) - 3600), SECRET,
                                  algorithm="HS256"),
    "not yet valid": lambda: jwt.encode(claims(nbf=int(time.time()) + 3600), SECRET,
                                        algorithm="HS256"),
    "missing jti": lambda: jwt.encode({k: v for k, v in claims().items() if k != "jti"},
                                      SECRET, algorithm="HS256"),
    "opaque refresh token as access token": lambda: "s_" + "a" * 22 + "." + "b" * 43,
}


@pytest.mark.parametrize("name", list(FORGERIES))
async def test_a_forged_or_misused_token_is_refused_on_every_node(cluster: Cluster,
                                                                  name: str) -> None:
    token = FORGERIES[name]()
    for node in cluster(2):
        with pytest.raises(InvalidStatus) as refused:
            await Client.open(f"{node.url}?token={token}")
        assert refused.value.response.status_code == 401
        first = await Client.open(node.url)
        await first.send(type="auth", token=token)
        code, reason = await first.closed()
        assert code == 4401, reason
        assert token not in reason
