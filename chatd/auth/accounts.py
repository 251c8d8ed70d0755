"""The rules of accounts and sessions: login, refresh rotation, logout, revocation, user admin.

:class:`Accounts` works against the abstract :class:`chatd.backends.base.State` (SQLite for the
embedded default, Redis for a cluster) and does no network I/O of its own: what other nodes must
do (close the sockets of a revoked session, say) it hands to the ``publish`` callable as
:class:`chatd.backends.base.CloseMatching` events, which the server wires to
``Broker.publish_control``. Password hashing runs through
:class:`chatd.auth.password_service.PasswordService` (off the event loop, bounded).

How the server calls it::

    accounts = Accounts.for_node(node)                      # once, after the node is built
    claims, extra = await accounts.login(user, password, device, conn.addr)   # first frame
    claims, extra = await accounts.refresh(refresh_token)                     # first frame
    claims, extra = await accounts.refresh(refresh_token, user=conn.user)     # live connection
    # welcome: session=claims.sid, expires_at=int(claims.exp), **extra
    # tokens:  expires_at=int(claims.exp), **extra
    await accounts.admit(claims)          # after TokenVerifier.verify: revoked 4410 / disabled 4403
    await accounts.logout(claims, everywhere=False, conn_id=conn.conn_id)   # then close 1000
    await accounts.kick(user) / revoke_tokens(user) / revoke_jti(jti, exp)
    await accounts.disable_user(user) / enable_user(user)                   # admin ops
    await accounts.add_user(name, pw) / set_password(name, pw) / delete_user(name)  # CLI

``extra`` is ``{"access_token", "refresh_token", "refresh_expires_at"}``, ready for the ``welcome``
or ``tokens`` frame. Every refusal is a :class:`chatd.errors.AuthError` (a ``CloseConnection``)
whose ``code`` is the close code of contract section 7:

============================================  =====  =================================
refusal                                       code   reason
============================================  =====  =================================
unknown user or wrong password (same answer)  4401   ``invalid user name or password``
throttled login (no hashing done)             4029   ``too many login attempts``
hashing queue full                            1013   ``server busy, try again later``
disabled user (login, refresh, connect)       4403   ``user disabled``
unknown / expired / malformed refresh token   4401   ``invalid refresh token``
refresh token of another user (live refresh)  4401   ``refresh token of another user``
reused refresh token (session revoked)        4410   ``refresh token reused``
over ``auth.max_refreshes_per_day``           4410   ``too many refreshes, log in again``
revoked access token (``admit``)              4410   ``token revoked``
============================================  =====  =================================

Events published (every node closes the matching sockets):

- reuse of a refresh token: ``CloseMatching(4410, sid=...)``;
- logout: ``CloseMatching(4410, sid=...)`` (or ``jti=`` for a token without session, or
  ``user=`` with ``everywhere``) with ``except_conn`` = the logging-out connection, which the
  server closes itself with 1000;
- single-session policy (``auth.max_sessions_per_user``, applied atomically by
  ``State.create_session``): ``CloseMatching(4409, sid=...)`` for each older session ended by
  a new login;
- ``kick``: ``CloseMatching(4410, user=...)``; ``revoke_tokens``: ``(4410, user=...,
  issued_before=now)``; ``revoke_jti``: ``(4410, jti=...)``; ``disable_user``:
  ``(4403, user=...)``; ``set_password`` and ``delete_user``: ``(4410, ...)``.

Refresh tokens are opaque: ``"<sid>.<random>"`` (``s_`` + 22 characters, a dot, 43 characters
of ``secrets.token_urlsafe``); only their SHA-256 is stored. Each use rotates (new access token,
new refresh token, the old one stops working); presenting a rotated-away token again is reuse
and revokes the whole session, unless it comes back within ``auth.refresh_reuse_grace`` seconds
of its rotation (a client that lost the answer, or a second browser tab sharing the token: a
new branch, and both tokens keep working; off by default). A value the session never issued is
only ``invalid refresh token``, with no side effect (:mod:`chatd.backends.sessions`). A session
lives ``auth.refresh_ttl`` from login: refreshing does not extend it.

Deny entries expire with the tokens they deny: a session or a ``jti`` for ``access_ttl +
leeway``, a user's "issued before" mark for :data:`USER_REVOKE_HORIZON` (tokens from an
external issuer may live longer than chatd's own).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from chatd.auth.password_service import PasswordService
from chatd.auth.throttle import LoginThrottle
from chatd.auth.tokens import ID_RE, MAX_TIME_CLAIM, Claims, TokenIssuer
from chatd.backends.base import (
    CloseMatching,
    RefreshUpdate,
    RotateOutcome,
    SessionRecord,
    State,
    TokenVerdict,
    UserRecord,
)
from chatd.codes import CloseCode, ErrorCode
from chatd.config import AuthConfig
from chatd.errors import AuthError, CommandError, InvalidInput
from chatd.protocol import USER_RE

SID_PREFIX = "s_"
#: ``s_`` + token_urlsafe(16) ``.`` token_urlsafe(32); lengths allow future growth.
REFRESH_RE = re.compile(r"^(s_[A-Za-z0-9_-]{16,64})\.([A-Za-z0-9_-]{32,128})\Z")
#: How long "every token of this user issued before now" is remembered.
USER_REVOKE_HORIZON = 30 * 86400.0
#: An admin's ``revoke_jti`` with a far-future ``exp`` is remembered at most this long.
MAX_JTI_HORIZON = 366 * 86400.0
DAY = 86400

BAD_LOGIN = "invalid user name or password"
BAD_REFRESH = "invalid refresh token"

Publish = Callable[[CloseMatching], Awaitable[None]]


def refresh_hash(token: str) -> str:
    """The stored form of a refresh token: hex SHA-256 (the token has 256 random bits)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_sid() -> str:
    """A fresh session id, ``s_`` + 128 random bits."""
    return SID_PREFIX + secrets.token_urlsafe(16)


def new_refresh_token(sid: str) -> str:
    """A fresh opaque refresh token bound to ``sid``."""
    return f"{sid}.{secrets.token_urlsafe(32)}"


def _value(source: Any) -> Any:
    return source() if callable(source) else source


class Accounts:
    """Login, refresh, logout, revocation and user management (see the module docstring).

    Args:
        state: the backend's account state.
        passwords: hashing off the event loop.
        issuer: signs access tokens; a callable returning the current one is accepted too, so a
            key reload (SIGHUP) that replaces the node's issuer applies at once. None for the
            CLI, which never issues tokens here.
        auth: the ``[auth]`` settings, or a callable returning the current ones.
        publish: delivers control events to every node (``Broker.publish_control``); None when
            there is no running node to tell (the CLI), deny entries then do the work.
        clock: unix seconds.
        throttle: the login throttle (a fresh one by default).
    """

    def __init__(
        self,
        state: State,
        passwords: PasswordService,
        issuer: TokenIssuer | Callable[[], TokenIssuer] | None,
        auth: AuthConfig | Callable[[], AuthConfig],
        *,
        publish: Publish | None = None,
        clock: Callable[[], float] = time.time,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.state = state
        self.passwords = passwords
        self._issuer = issuer
        self._auth = auth
        self._publish = publish
        self._clock = clock
        self.throttle = throttle or LoginThrottle(clock=clock)

    @classmethod
    def for_node(cls, node: Any) -> Accounts:
        """Accounts wired to a :class:`chatd.server.Node`: its state, broker, issuer and config.

        The node's ``issuer`` and ``config`` are read on every call, so a reload applies.
        """
        return cls(
            node.backend.state,
            PasswordService(node.config.auth.hash_concurrency),
            lambda: node.issuer,
            lambda: node.config.auth,
            publish=node.backend.broker.publish_control,
            clock=node.clock,
        )

    @property
    def auth(self) -> AuthConfig:
        value: AuthConfig = _value(self._auth)
        return value

    @property
    def issuer(self) -> TokenIssuer:
        value: TokenIssuer | None = _value(self._issuer)
        if value is None:
            raise AuthError("login is not enabled")
        return value

    # -- login and refresh -------------------------------------------------------------------

    async def login(
        self, username: str, password: str, device: str = "", address: str = ""
    ) -> tuple[Claims, dict[str, Any]]:
        """Check a password and open a session.

        Returns:
            The new access token's claims (``sid`` set) and the ``welcome`` token fields.

        Raises:
            AuthError: see the table in the module docstring.
        """
        a = self.auth
        username = username if isinstance(username, str) else ""
        if not self.throttle.try_begin(
            username,
            address,
            per_user=a.login_attempts_per_user,
            per_address=a.login_attempts_per_address,
            window=a.login_window,
        ):
            raise AuthError("too many login attempts", code=CloseCode.RATE_ABUSED)
        record = await self.state.get_user(username) if USER_RE.match(username) else None
        stored = record.password_hash if record is not None else None
        # Always hash, even for an unknown user (a dummy hash): same answer, same time.
        if not await self.passwords.verify(stored, password) or record is None or stored is None:
            raise AuthError(BAD_LOGIN)
        self.throttle.succeeded(username, address)
        if record.disabled:
            raise AuthError("user disabled", code=CloseCode.USER_DISABLED, http_code="forbidden")
        if self.passwords.needs_rehash(stored):
            await self._rehash(record, password)
        now = self._clock()
        sid = new_sid()
        token = new_refresh_token(sid)
        session = SessionRecord(
            sid=sid,
            user=record.name,
            device=device if isinstance(device, str) else "",
            created_at=now,
            expires_at=now + a.refresh_ttl,
            refresh_hash=refresh_hash(token),
            rotated_at=now,
            refreshes_today=0,
            day=int(now // DAY),
        )
        # The single-session policy is applied by the backend in the same atomic step as the
        # creation: two simultaneous logins with a limit of 1 leave exactly one session.
        ended = await self.state.create_session(session, max(0, a.max_sessions_per_user))
        for old in ended:
            await self._end_session(old, CloseCode.REPLACED, "replaced by a newer login",
                                    deleted=True)
        return self._grant(record.name, sid, token, session.expires_at)

    async def refresh(
        self, refresh_token: str, *, user: str | None = None
    ) -> tuple[Claims, dict[str, Any]]:
        """Rotate a refresh token: a new access token and a new refresh token.

        Args:
            refresh_token: as presented by the client.
            user: on a live connection, its user; a token of another user's session is refused
                before anything changes.

        Raises:
            AuthError: see the table in the module docstring. On reuse the session has been
                revoked (its sockets everywhere get 4410) before this is raised.
        """
        a = self.auth
        m = REFRESH_RE.match(refresh_token) if isinstance(refresh_token, str) else None
        if m is None:
            raise AuthError(BAD_REFRESH)
        sid = m.group(1)
        session = await self.state.get_session(sid)
        if session is None:
            raise AuthError(BAD_REFRESH)
        if user is not None and session.user != user:
            raise AuthError("refresh token of another user")
        record = await self.state.get_user(session.user)
        if record is None:  # the account was deleted
            await self.state.delete_session(sid)
            raise AuthError(BAD_REFRESH)
        if record.disabled:
            raise AuthError("user disabled", code=CloseCode.USER_DISABLED, http_code="forbidden")
        presented = refresh_hash(refresh_token)
        now = self._clock()
        day = int(now // DAY)
        count = session.refreshes_today if session.day == day else 0
        if count >= a.max_refreshes_per_day:
            if session.valid(presented):
                await self.state.delete_session(sid)  # the holder must log in again
            raise AuthError("too many refreshes, log in again", code=CloseCode.REVOKED)
        token = new_refresh_token(sid)
        update = RefreshUpdate(
            new_hash=refresh_hash(token), rotated_at=now, refreshes_today=count + 1, day=day
        )
        outcome = await self.state.rotate_refresh(sid, presented, update, a.refresh_reuse_grace)
        if outcome is RotateOutcome.UNKNOWN:
            # Never issued by this session (a forged "<sid>.<anything>": the sid is public) or
            # older than the spent tokens remembered: refused, and nothing else happens.
            raise AuthError(BAD_REFRESH)
        if outcome is RotateOutcome.REUSED:
            await self._end_session(sid, CloseCode.REVOKED, "refresh token reused")
            raise AuthError("refresh token reused", code=CloseCode.REVOKED)
        return self._grant(session.user, sid, token, session.expires_at)

    def _grant(
        self, user: str, sid: str, refresh_token: str, refresh_expires_at: float
    ) -> tuple[Claims, dict[str, Any]]:
        access, claims = self.issuer.issue(user, self.auth.access_ttl, sid=sid)
        return claims, {
            "access_token": access,
            "refresh_token": refresh_token,
            "refresh_expires_at": int(refresh_expires_at),
        }

    async def _rehash(self, record: UserRecord, password: str) -> None:
        """Store a hash with the current parameters (they rose since this one was made)."""
        new_hash = await self.passwords.hash(password)
        current = await self.state.get_user(record.name)
        # Only if nobody changed the password meanwhile (``chatd user passwd`` elsewhere).
        if current is not None and current.password_hash == record.password_hash:
            await self.state.put_user(replace(current, password_hash=new_hash))

    # -- admission and revocation ------------------------------------------------------------

    async def admit(self, claims: Claims) -> None:
        """Whether a verified access token may be used now (deny lists, disabled users).

        Raises:
            AuthError: ``user disabled`` (4403, HTTP code ``forbidden``) or ``token revoked``
                (4410).
        """
        verdict = await self.state.token_verdict(claims.sub, claims.jti, claims.sid, claims.iat,
                                                 claims.iss)
        if verdict is TokenVerdict.DISABLED:
            raise AuthError("user disabled", code=CloseCode.USER_DISABLED, http_code="forbidden")
        if verdict is TokenVerdict.REVOKED:
            raise AuthError("token revoked", code=CloseCode.REVOKED)

    async def logout(
        self, claims: Claims, *, everywhere: bool = False, conn_id: str | None = None
    ) -> None:
        """Revoke the session of ``claims`` (or, ``everywhere``, every token and session of
        the user). Other sockets close with 4410; the caller closes its own (``conn_id``)
        with 1000."""
        now = self._clock()
        if everywhere:
            await self._revoke_user(claims.sub, now)
            await self._send(
                CloseMatching(CloseCode.REVOKED, "logged out", user=claims.sub, except_conn=conn_id)
            )
            return
        # Scoped to the token's issuer and subject: another issuer's token that happens to carry
        # the same jti is not this user's to revoke.
        await self.state.revoke_jti(claims.jti, claims.exp + self.auth.leeway,
                                    issuer=claims.iss, user=claims.sub)
        if claims.sid is not None:
            await self._end_session(
                claims.sid, CloseCode.REVOKED, "logged out", except_conn=conn_id
            )
        else:
            await self._send(
                CloseMatching(CloseCode.REVOKED, "logged out", jti=claims.jti, except_conn=conn_id)
            )

    async def kick(self, user: str) -> None:
        """Close every connection of ``user`` (4410); their tokens stay valid."""
        await self._send(CloseMatching(CloseCode.REVOKED, "kicked", user=user))

    async def revoke_tokens(self, user: str) -> None:
        """Refuse every token of ``user`` issued before now (by ``iat``, external ones too) and
        end the user's sessions, so no refresh token can mint a new one.

        ``iat`` up to ``auth.leeway`` in the future counts as before now (an issuer whose clock
        runs ahead); tokens of sessions opened after this call are not affected.
        """
        now = self._clock()
        await self._revoke_user(user, now)
        await self._send(CloseMatching(CloseCode.REVOKED, "tokens revoked", user=user,
                                       issued_before=now + self.auth.leeway))

    async def revoke_jti(self, jti: str, exp: float | None = None) -> None:
        """Refuse every token with id ``jti`` (any issuer and subject: the admin names only the
        jti) until its ``exp`` (when known) and close its sockets.

        Raises:
            CommandError: ``bad_request`` for a ``jti`` chatd would never accept (the verifier's
                rule: 1-128 printable characters, no spaces or line breaks), or a bad ``exp``.
        """
        if not isinstance(jti, str) or not ID_RE.match(jti):
            raise CommandError(ErrorCode.BAD_REQUEST, "invalid jti")
        if exp is not None and not 0 <= exp <= MAX_TIME_CLAIM:
            raise CommandError(ErrorCode.BAD_REQUEST, "invalid exp")
        now = self._clock()
        until = (exp + self.auth.leeway) if exp is not None else now + USER_REVOKE_HORIZON
        await self.state.revoke_jti(jti, min(until, now + MAX_JTI_HORIZON))
        await self._send(CloseMatching(CloseCode.REVOKED, "token revoked", jti=jti))

    async def disable_user(self, user: str) -> None:
        """Disable ``user``: no login, refresh or connection (4403); open sockets close 4403.

        Sessions are kept (refreshing them answers 4403) so that :meth:`enable_user` undoes
        exactly this. A user without an account (known only from external tokens) gets a
        password-less, disabled account so the ban holds.

        Raises:
            InvalidInput: ``user`` is not a valid user name.
        """
        if not USER_RE.match(user):
            raise InvalidInput("invalid user name")
        if not await self.state.set_disabled(user, True):
            await self.state.put_user(UserRecord(user, None, True, self._clock()))
        await self._send(CloseMatching(CloseCode.USER_DISABLED, "user disabled", user=user))

    async def enable_user(self, user: str) -> bool:
        """Enable ``user`` again; False for an unknown user."""
        return await self.state.set_disabled(user, False)

    async def _revoke_user(self, user: str, now: float) -> None:
        await self.state.revoke_user_before(user, now, now + USER_REVOKE_HORIZON,
                                            skew=self.auth.leeway)
        for s in await self.state.user_sessions(user):
            await self.state.delete_session(s.sid)

    async def _end_session(
        self, sid: str, code: CloseCode, reason: str, *, except_conn: str | None = None,
        deleted: bool = False,
    ) -> None:
        """Delete a session (unless ``deleted`` already), deny its access tokens, close its
        sockets everywhere. The deny entry comes first: a socket of the session that
        registers after the event went out is refused by :meth:`admit`."""
        a = self.auth
        if not deleted:
            await self.state.delete_session(sid)
        await self.state.revoke_session(sid, self._clock() + a.access_ttl + a.leeway)
        await self._send(CloseMatching(code, reason, sid=sid, except_conn=except_conn))

    async def _send(self, event: CloseMatching) -> None:
        if self._publish is not None:
            await self._publish(event)

    # -- user management (CLI) ---------------------------------------------------------------

    async def add_user(self, name: str, password: str) -> UserRecord:
        """Create an account.

        Raises:
            InvalidInput: invalid name, the user exists, or an empty / too long password.
        """
        if not isinstance(name, str) or not USER_RE.match(name):
            raise InvalidInput("invalid user name")
        if await self.state.get_user(name) is not None:
            raise InvalidInput(f"user {name!r} already exists")
        record = UserRecord(name, await self.passwords.hash(password), False, self._clock())
        await self.state.put_user(record)
        return record

    async def set_password(self, name: str, password: str) -> bool:
        """Change a password and end the user's sessions; False for an unknown user."""
        record = await self.state.get_user(name)
        if record is None:
            return False
        new_hash = await self.passwords.hash(password)
        await self.state.put_user(replace(record, password_hash=new_hash))
        for s in await self.state.user_sessions(name):
            await self._end_session(s.sid, CloseCode.REVOKED, "password changed")
        return True

    async def delete_user(self, name: str) -> bool:
        """Delete an account, end its sessions and refuse its tokens; False when unknown."""
        if not await self.state.delete_user(name):
            return False
        await self._revoke_user(name, self._clock())
        await self._send(CloseMatching(CloseCode.REVOKED, "user deleted", user=name))
        return True
