"""Access tokens (JWT): the claims policy of contract section 2, on top of pyjwt.

Verification order, so that a client is told the most useful single reason:

1. the header: parseable, ``alg`` not ``none`` (any casing), ``typ`` ``JWT``/``at+jwt`` or absent
   (``refresh+jwt`` and anything else: ``wrong token type``), ``crit`` only with what pyjwt
   understands;
2. the key: by ``kid`` when the token names one (unknown or path-like: ``unknown key``), else the
   keys without ``kid``; the header's ``alg`` must be the key's one algorithm
   (``algorithm not allowed``);
3. the signature (``bad signature``), by pyjwt with the key object of the right type;
4. the claims: ``sub``, ``exp``, ``iat``, ``jti`` required; ``iss``/``aud`` required when
   configured and checked when present; ``nbf`` and ``iat`` not in the future; ``sub`` a valid
   user name;
5. expiry last: ``token expired`` carries ``http_code="token_expired"`` only when it is the
   sole fault, so a client that refetches a token on that code is never misled.

Time comes from an injected clock (pyjwt's own time checks are switched off and done here), so
tests never sleep. ``jku``, ``x5u``, ``jwk`` and ``x5c`` headers are never consulted: keys come
only from the configuration. Every ``jwt.*`` exception stops in this module.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from chatd.auth.keys import KeyRing
from chatd.core.rooms import valid_claim
from chatd.errors import AuthError, InvalidInput
from chatd.protocol import USER_RE

#: ``typ`` values of an access token (RFC 9068 ``at+jwt``; media types compare case-insensitively
#: and may carry the ``application/`` prefix, RFC 7515 section 4.1.9).
ACCESS_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
#: A token longer than this is refused before parsing (a handshake header or one frame).
MAX_TOKEN_CHARS = 8192
#: ``jti`` and ``sid`` values chatd accepts: short and printable, they end up in deny lists.
ID_RE = re.compile(r"^[A-Za-z0-9_.:+/=-]{1,128}\Z")
ROLE_ADMIN = "admin"
#: Time claims beyond this (9999-12-31T23:59:59Z) are refused: a larger integer overflows the
#: 64-bit encoders downstream (orjson refuses >= 2**64) and no real token lives that long.
MAX_TIME_CLAIM = 253_402_300_799

_REQUIRED = ("sub", "exp", "iat", "jti")


@dataclass(frozen=True, slots=True)
class Claims:
    """The claims of a verified access token that chatd uses.

    ``iat`` and ``exp`` are unix seconds. chatd issues whole seconds (RFC 7519 NumericDate;
    strict JWT libraries refuse fractions) and accepts fractions from external issuers.
    ``revoke_tokens`` tells tokens issued just after it by their session, not by ``iat``
    (see :meth:`chatd.backends.base.State.token_verdict`). ``iss`` is ``""`` when absent.
    """

    sub: str
    jti: str
    iat: float
    exp: float
    sid: str | None = None
    role: str | None = None
    #: The ``rooms`` claim: room names and ``prefix*`` patterns it grants (section 9).
    rooms: tuple[str, ...] = ()
    iss: str = ""

    @property
    def is_admin(self) -> bool:
        """True when the token grants the admin commands of contract section 6."""
        return self.role == ROLE_ADMIN


class TokenVerifier:
    """Verifies access tokens against a :class:`KeyRing`; no I/O, no revocation look-ups.

    Revocation (deny lists, disabled users) is a separate, backend-backed step
    (``State.token_verdict``) that the shell runs after :meth:`verify` succeeds.

    Attributes:
        keyring: replace it to reload keys (SIGHUP); verification picks up the new ring at once.
    """

    def __init__(
        self,
        keyring: KeyRing,
        *,
        leeway: float,
        issuer: str = "",
        audience: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= leeway <= 300:
            raise InvalidInput("leeway must be within 0-300 seconds")
        self.keyring = keyring
        self.leeway = float(leeway)
        self.issuer = issuer
        self.audience = audience
        self._clock = clock
        # pyjwt checks signature, required claims, iss, aud, and claim types; time is ours.
        self._options: dict[str, Any] = {
            "verify_signature": True,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_iss": True,
            "verify_aud": True,
            "verify_sub": True,
            "verify_jti": True,
            "require": [*_REQUIRED, *(["iss"] if issuer else []), *(["aud"] if audience else [])],
        }
        self._jwt = jwt.PyJWT(options={"enforce_minimum_key_length": True})

    def verify(self, token: str) -> Claims:
        """Verify ``token`` and return its claims.

        Raises:
            AuthError: with a short reason that never echoes the token: ``malformed token``,
                ``algorithm not allowed``, ``wrong token type``, ``unknown key``,
                ``bad signature``, ``missing claim sub`` (``exp``, ``iat``, ``jti``, ``iss``,
                ``aud``), ``invalid claim exp`` (...), ``token not yet valid``,
                ``wrong issuer``, ``wrong audience``, ``invalid user name``,
                ``token expired`` (``http_code="token_expired"``).
        """
        return self._claims(self.verified_payload(token))

    def verified_payload(self, token: str, *, types: frozenset[str] = ACCESS_TYPES,
                         typ_required: bool = False,
                         require: tuple[str, ...] = _REQUIRED) -> dict[str, Any]:
        """Steps 1-3 (header, key, signature) and pyjwt's claim checks, for any token type.

        Room tokens (:mod:`chatd.auth.room_tokens`) share this with access tokens: the same
        keys, algorithm pinning, ``iss``/``aud`` policy; only ``typ`` and the claims differ.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise AuthError("malformed token")
        header = self._header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise AuthError("malformed token")
        if alg.lower() == "none":
            raise AuthError("algorithm not allowed")
        typ = header.get("typ")
        if (typ is None and typ_required) or (
                typ is not None and (not isinstance(typ, str) or typ.lower() not in types)):
            raise AuthError("wrong token type")
        kid = header.get("kid")
        if kid is not None:
            key = self.keyring.by_kid(kid) if isinstance(kid, str) else None
            if key is None:
                raise AuthError("unknown key")
            candidates = [key] if key.alg == alg else []
        else:
            kidless = self.keyring.kidless()
            if not kidless:
                raise AuthError("unknown key")
            candidates = [k for k in kidless if k.alg == alg]
        if not candidates:
            raise AuthError("algorithm not allowed")
        return self._decode(token, candidates, require)

    def _header(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        except Exception:  # defensive: a parser bug must not become a traceback
            raise AuthError("malformed token") from None
        if not isinstance(header, dict):
            raise AuthError("malformed token")
        return header

    def _decode(self, token: str, candidates: list[Any],
                require: tuple[str, ...] = _REQUIRED) -> dict[str, Any]:
        options = self._options if require == _REQUIRED else {
            **self._options, "require": [*require, *self._options["require"][len(_REQUIRED):]]}
        for key in candidates:
            try:
                payload = self._jwt.decode(
                    token,
                    key=key.verify_key,
                    algorithms=[key.alg],
                    options=options,  # type: ignore[arg-type]
                    issuer=self.issuer or None,
                    audience=self.audience or None,
                )
            except jwt.InvalidSignatureError:
                continue  # another key without kid may match
            except jwt.PyJWTError as exc:
                raise AuthError(_reason(exc)) from None
            if not isinstance(payload, dict):  # pragma: no cover - pyjwt guarantees an object
                raise AuthError("malformed token")
            return payload
        raise AuthError("bad signature")

    def _claims(self, payload: dict[str, Any]) -> Claims:
        now = self._clock()
        iat = _number(payload, "iat")
        exp = _number(payload, "exp")
        nbf = _number(payload, "nbf") if "nbf" in payload else None
        if iat > now + self.leeway or (nbf is not None and nbf > now + self.leeway):
            raise AuthError("token not yet valid")
        sub = payload["sub"]
        if not USER_RE.match(sub):
            raise AuthError("invalid user name")
        jti = payload["jti"]
        if not ID_RE.match(jti):
            raise AuthError("invalid claim jti")
        sid = payload.get("sid")
        if sid is not None and (not isinstance(sid, str) or not ID_RE.match(sid)):
            raise AuthError("invalid claim sid")
        role = payload.get("role")
        if role is not None and not isinstance(role, str):
            raise AuthError("invalid claim role")
        rooms = valid_claim(payload["rooms"]) if "rooms" in payload else ()
        if rooms is None:
            raise AuthError("invalid claim rooms")
        iss = payload.get("iss", "")
        if not isinstance(iss, str) or len(iss) > 1024:
            raise AuthError("invalid claim iss")
        if exp <= now - self.leeway:
            raise AuthError("token expired", http_code="token_expired")
        return Claims(sub=sub, jti=jti, iat=iat, exp=exp, sid=sid, role=role, rooms=rooms,
                      iss=iss)


def _number(payload: dict[str, Any], name: str) -> float:
    """A time claim as a float, within ``0..MAX_TIME_CLAIM`` (finite, not a bool)."""
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(f"invalid claim {name}")
    # Compare before converting: float(2**1100) raises OverflowError.
    if not 0 <= value <= MAX_TIME_CLAIM:
        raise AuthError(f"invalid claim {name}")
    return float(value)


def _reason(exc: Exception) -> str:
    """A short reason for a pyjwt exception; the token itself never appears."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim}"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.exceptions.InvalidSubjectError):
        return "invalid user name"
    if isinstance(exc, jwt.exceptions.InvalidJTIError):
        return "invalid claim jti"
    if isinstance(exc, jwt.InvalidKeyError):
        return "unknown key"
    if isinstance(exc, jwt.ExpiredSignatureError):  # pragma: no cover - exp is checked here
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):  # pragma: no cover - nbf/iat checked here
        return "token not yet valid"
    return "malformed token"


class TokenIssuer:
    """Signs access tokens with the key ring's signing key.

    Tokens carry ``typ: JWT``, the signer's ``kid`` (when it has one), ``sub``, ``iat``, ``exp``,
    ``jti``, and ``sid`` / ``role`` / ``iss`` / ``aud`` when given or configured.

    Attributes:
        keyring: replace it to reload keys; the next token is signed by the new signer.
    """

    def __init__(
        self,
        keyring: KeyRing,
        *,
        issuer: str = "",
        audience: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keyring = keyring
        self.issuer = issuer
        self.audience = audience
        self._clock = clock
        self._jwt = jwt.PyJWT(options={"enforce_minimum_key_length": True})

    def issue(
        self,
        sub: str,
        ttl: float,
        *,
        role: str | None = None,
        sid: str | None = None,
        jti: str | None = None,
        rooms: tuple[str, ...] = (),
    ) -> tuple[str, Claims]:
        """A signed access token for ``sub`` valid ``ttl`` seconds from now.

        Raises:
            InvalidInput: ``sub`` is not a valid user name, ``ttl`` is not positive, or no key
                can sign (only verify-only keys configured and no default key).
        """
        if not isinstance(sub, str) or not USER_RE.match(sub):
            raise InvalidInput("invalid user name")
        if not ttl > 0:
            raise InvalidInput("ttl must be positive")
        signer = self.keyring.signer
        if signer is None or signer.sign_key is None:
            raise InvalidInput("no signing key configured")
        # Whole seconds, rounded down (RFC 7519 NumericDate; strict libraries refuse
        # fractions); ``exp - iat`` is ``ttl`` rounded up.
        iat = math.floor(self._clock())
        exp = iat + math.ceil(float(ttl))
        claims = Claims(
            sub=sub,
            jti=jti or secrets.token_urlsafe(16),
            iat=float(iat),
            exp=float(exp),
            sid=sid,
            role=role,
            rooms=tuple(rooms),
            iss=self.issuer,
        )
        payload: dict[str, Any] = {
            "sub": sub,
            "iat": iat,
            "exp": exp,
            "jti": claims.jti,
        }
        if sid is not None:
            payload["sid"] = sid
        if role is not None:
            payload["role"] = role
        if rooms:
            if valid_claim(list(rooms)) is None:
                raise InvalidInput("rooms must be room names or prefix* patterns")
            payload["rooms"] = list(rooms)
        if self.issuer:
            payload["iss"] = self.issuer
        if self.audience:
            payload["aud"] = self.audience
        headers: dict[str, Any] = {"typ": "JWT"}
        if signer.kid:
            headers["kid"] = signer.kid
        try:
            token = self._jwt.encode(
                payload, signer.sign_key, algorithm=signer.alg, headers=headers
            )
        except jwt.PyJWTError as exc:  # pragma: no cover - keys are validated at load
            raise InvalidInput(f"cannot sign with {signer.source}: {type(exc).__name__}") from None
        return token, claims
