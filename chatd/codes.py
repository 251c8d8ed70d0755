"""Every error code and close code of the wire protocol (docs/protocol.md, sections 5 and 7).

Clients are written against these values: never renumber or rename one.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """``code`` of an ``error`` frame; the connection stays open."""

    BAD_REQUEST = "bad_request"
    NOT_JOINED = "not_joined"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # the thing already exists (section 9: create)
    RATE_LIMITED = "rate_limited"
    TOO_MANY_ROOMS = "too_many_rooms"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """WebSocket close codes chatd sends, with whether a client should reconnect."""

    NORMAL = 1000  # logout, client close: stop
    GOING_AWAY = 1001  # shutting down or draining: reconnect with backoff
    UNSUPPORTED_DATA = 1003  # binary frame: fix the client
    MESSAGE_TOO_BIG = 1009  # frame too big: fix the client
    INTERNAL_ERROR = 1011  # reconnect with backoff
    TRY_AGAIN_LATER = 1013  # node full: reconnect with backoff
    TOKEN_EXPIRED = 4001  # get a fresh token, reconnect
    SLOW_CONSUMER = 4002  # reconnect, resume with since
    FEED_LOST = 4004  # backend feed lost, messages may be missed: reconnect, resume with since
    RATE_ABUSED = 4029  # back off, reconnect
    PROTOCOL_VIOLATION = 4400  # fix the client
    BAD_CREDENTIAL = 4401  # do not retry with the same credential
    USER_DISABLED = 4403  # stop
    AUTH_TIMEOUT = 4408  # reconnect and authenticate
    REPLACED = 4409  # single-session policy: stop, tell the user
    REVOKED = 4410  # stop, log in again


#: Close codes after which a client should reconnect (with backoff).
RECONNECT = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.INTERNAL_ERROR,
        CloseCode.TRY_AGAIN_LATER,
        CloseCode.TOKEN_EXPIRED,
        CloseCode.SLOW_CONSUMER,
        CloseCode.FEED_LOST,
        CloseCode.RATE_ABUSED,
        CloseCode.AUTH_TIMEOUT,
    }
)
