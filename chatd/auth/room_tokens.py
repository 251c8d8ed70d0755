"""Room tokens (``typ: room+jwt``): a grant of one room to one user, sent as ``grant`` on ``join``.

An application signs one after its connection is open (contract section 9) to let a user into a
``token`` room. A room token is verified exactly like an access token (the same keys, the same
algorithm pinning, ``kid`` selection, ``iss`` / ``aud`` / ``nbf`` / leeway policy: it goes
through :meth:`chatd.auth.tokens.TokenVerifier.verified_payload`), with three differences:

- header ``typ`` must be ``room+jwt`` (or ``application/room+jwt``); an access token is never a
  room token, and a room token is never an access token (its ``typ`` is refused there);
- claims ``sub``, ``room``, ``exp``, ``iat`` are required (``jti`` is not), ``role`` optional;
- it is bound: ``sub`` must be the connection's user and ``room`` the room being joined.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jwt

from chatd.auth.tokens import TokenIssuer, TokenVerifier
from chatd.codes import ErrorCode
from chatd.core.rooms import ROLES, ROOM_RE, Grant
from chatd.errors import AuthError, CommandError, InvalidInput

ROOM_TOKEN_TYPES = frozenset({"room+jwt", "application/room+jwt"})
_REQUIRED = ("sub", "room", "exp", "iat")


class RoomTokenError(CommandError):
    """A ``grant`` that is refused: answered ``forbidden``, the connection stays open."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.FORBIDDEN, f"room token refused: {reason}")
        self.reason = reason


def verify_room_token(verifier: TokenVerifier, token: str, *, user: str, room: str,
                      clock: Callable[[], float]) -> Grant:
    """Verify a room token presented by ``user`` to join ``room``.

    Raises:
        RoomTokenError: with a reason that never echoes the token: those of access tokens
            (``bad signature``, ``unknown key``, ``algorithm not allowed``, ``token expired``,
            ``wrong token type``, ...) and ``token for another user``, ``token for another
            room``, ``invalid claim room``, ``invalid claim role``.
    """
    try:
        payload = verifier.verified_payload(token, types=ROOM_TOKEN_TYPES, typ_required=True,
                                            require=_REQUIRED)
    except AuthError as exc:
        raise RoomTokenError(exc.reason) from None
    now = clock()
    leeway = verifier.leeway
    iat = _number(payload, "iat")
    exp = _number(payload, "exp")
    nbf = _number(payload, "nbf") if "nbf" in payload else None
    if iat > now + leeway or (nbf is not None and nbf > now + leeway):
        raise RoomTokenError("token not yet valid")
    claimed_room = payload["room"]
    if not isinstance(claimed_room, str) or not ROOM_RE.match(claimed_room):
        raise RoomTokenError("invalid claim room")
    role = payload.get("role")
    if role is not None and role not in ROLES:
        raise RoomTokenError("invalid claim role")
    if payload["sub"] != user:
        raise RoomTokenError("token for another user")
    if claimed_room != room:
        raise RoomTokenError("token for another room")
    if exp <= now - leeway:
        raise RoomTokenError("token expired")
    return Grant(room=room, role=role, expires_at=exp + leeway)


def issue_room_token(issuer: TokenIssuer, user: str, room: str, ttl: float, *,
                     role: str | None = None, clock: Callable[[], float] = time.time) -> str:
    """A room token for ``user`` and ``room`` valid ``ttl`` seconds (applications, tests, CLI).

    Raises:
        InvalidInput: a bad room, role or ttl, or no key can sign.
    """
    if not ROOM_RE.match(room):
        raise InvalidInput("invalid room name")
    if role is not None and role not in ROLES:
        raise InvalidInput("role must be owner, moderator or member")
    if not ttl > 0:
        raise InvalidInput("ttl must be positive")
    signer = issuer.keyring.signer
    if signer is None or signer.sign_key is None:
        raise InvalidInput("no signing key configured")
    iat = math.floor(clock() * 1000) / 1000
    payload: dict[str, Any] = {"sub": user, "room": room, "iat": iat, "exp": iat + float(ttl)}
    if role is not None:
        payload["role"] = role
    if issuer.issuer:
        payload["iss"] = issuer.issuer
    if issuer.audience:
        payload["aud"] = issuer.audience
    headers: dict[str, Any] = {"typ": "room+jwt"}
    if signer.kid:
        headers["kid"] = signer.kid
    try:
        return jwt.encode(payload, signer.sign_key, algorithm=signer.alg, headers=headers)
    except jwt.PyJWTError as exc:  # pragma: no cover - keys are validated at load
        raise InvalidInput(f"cannot sign with {signer.source}: {type(exc).__name__}") from None


def _number(payload: dict[str, Any], name: str) -> float:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RoomTokenError(f"invalid claim {name}")
    return float(value)
