"""One client's state machine: awaiting auth -> ready -> closed. No I/O.

The shell feeds every incoming frame to :meth:`Session.receive`, which returns a validated
:class:`~chatd.protocol.Command` the shell may carry out, or raises:

- :class:`~chatd.errors.CommandError`: answer with an ``error`` frame, keep the connection;
- :class:`~chatd.errors.CloseConnection`: close with its code.

Everything that decides *whether* a command may run (authentication phase, rate limit, bad-frame
budget, room membership and limits, admin role) lives here, so it is tested by plain calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

from chatd import protocol
from chatd.codes import CloseCode, ErrorCode
from chatd.config import LimitsConfig
from chatd.core.room_seats import Seat
from chatd.core.rooms import Actor
from chatd.errors import CloseConnection, CommandError

if TYPE_CHECKING:
    from chatd.auth.tokens import Claims


class Phase(Enum):
    AWAITING_AUTH = "awaiting_auth"
    READY = "ready"
    CLOSED = "closed"


class TokenBucket:
    """Per-connection rate limit: ``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


_ROOM_COMMANDS_NEED_JOIN = frozenset({"send", "who", "history"})


class Session:
    """The protocol state of one connection.

    Args:
        limits: the ``[limits]`` config section.
        clock: monotonic seconds (injectable).
    """

    def __init__(self, limits: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.phase = Phase.AWAITING_AUTH
        self.claims: Claims | None = None
        self.rooms: set[str] = set()
        #: What ``join`` decided for each joined room (role, mute, grant): section 9.
        self.seats: dict[str, Seat] = {}
        self.bad_frames = 0
        self.rate_limited = 0
        self.bucket = TokenBucket(limits.rate, limits.burst, clock())

    @property
    def user(self) -> str:
        assert self.claims is not None
        return self.claims.sub

    @property
    def actor(self) -> Actor:
        """Who runs room commands: the user, the admin role and the ``rooms`` claim."""
        assert self.claims is not None
        return Actor(self.claims.sub, self.claims.is_admin, self.claims.rooms)

    def receive(self, data: str | bytes) -> protocol.Command:
        """Check one incoming frame and return the command to carry out."""
        if self.phase is Phase.CLOSED:
            raise CloseConnection(CloseCode.NORMAL, "closed")
        if isinstance(data, bytes):
            raise CloseConnection(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
        if self.phase is Phase.AWAITING_AUTH:
            return self._receive_first(data)
        obj: dict[str, object] | None = None
        try:
            obj = protocol.decode(data)
            if not self.bucket.take(self.clock()):
                self.rate_limited += 1
                if self.rate_limited >= self.limits.max_rate_limited:
                    raise CloseConnection(CloseCode.RATE_ABUSED, "rate limit abused")
                raise CommandError(ErrorCode.RATE_LIMITED,
                                   f"over {self.limits.rate:g} messages per second, slow down")
            self.rate_limited = 0
            command = protocol.parse(obj, max_text_chars=self.limits.max_text_chars)
        except CommandError as exc:
            exc.ref = protocol.ref_of(obj) if obj is not None else None
            if exc.code is ErrorCode.BAD_REQUEST:
                self.bad_frames += 1
                if self.bad_frames >= self.limits.max_bad_frames:
                    raise CloseConnection(CloseCode.PROTOCOL_VIOLATION,
                                          "too many bad frames") from None
            raise
        self.bad_frames = 0
        try:
            self._check(command)
        except CommandError as exc:
            exc.ref = command.ref
            raise
        return command

    def _receive_first(self, data: str) -> protocol.Command:
        try:
            command = protocol.parse(protocol.decode(data),
                                     max_text_chars=self.limits.max_text_chars)
        except CommandError as exc:
            raise CloseConnection(CloseCode.BAD_CREDENTIAL, f"expected auth frame: {exc}") from None
        if command.type not in protocol.AUTH_TYPES:
            raise CloseConnection(CloseCode.BAD_CREDENTIAL,
                                  "expected an auth, login or refresh frame first")
        return command

    def _check(self, command: protocol.Command) -> None:
        kind, args = command.type, command.args
        if kind == "join":
            if args["room"] not in self.rooms and \
                    len(self.rooms) >= self.limits.max_rooms_per_connection:
                raise CommandError(
                    ErrorCode.TOO_MANY_ROOMS,
                    f"at most {self.limits.max_rooms_per_connection} rooms per connection")
        elif kind in _ROOM_COMMANDS_NEED_JOIN and "room" in args:
            if args["room"] not in self.rooms:
                raise CommandError(ErrorCode.NOT_JOINED, f"join {args['room']!r} first")
        elif kind == "login":
            raise CommandError(ErrorCode.BAD_REQUEST, "already authenticated")
        elif kind == "admin":
            assert self.claims is not None
            if not self.claims.is_admin:
                raise CommandError(ErrorCode.FORBIDDEN, "admin role required")

    # -- effects reported back by the shell ------------------------------------------------

    def authenticated(self, claims: Claims) -> None:
        self.claims = claims
        self.phase = Phase.READY

    def renewed(self, claims: Claims) -> None:
        """An in-band ``auth``/``refresh`` succeeded: the connection now lives by ``claims``."""
        if self.claims is not None and claims.sub != self.claims.sub:
            raise CommandError(ErrorCode.FORBIDDEN, "the new token is for another user")
        self.claims = claims

    def joined(self, room: str, seat: Seat | None = None) -> None:
        self.rooms.add(room)
        if seat is not None:
            self.seats[room] = seat

    def left(self, room: str) -> None:
        self.rooms.discard(room)
        self.seats.pop(room, None)

    def closed(self) -> None:
        self.phase = Phase.CLOSED
