"""One exception root for chatd; each class carries the wire answer it maps to.

Foreign exceptions (``jwt.*``, ``redis.*``, ``OSError`` from sockets) are translated into these
at the module that owns the foreign library, so the rest of the code handles only these.
"""

from __future__ import annotations

from chatd.codes import CloseCode, ErrorCode


class ChatdError(Exception):
    """Root of every exception chatd raises on purpose."""


class ConfigError(ChatdError):
    """An invalid setting; the message names the key (``limits.max_frame_bytes: ...``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class InvalidInput(ChatdError):
    """A value a layer refuses (a bad user name, a password too long, no signing key).

    Raised by ``auth/`` where it used to raise ``ValueError``; the message says why and never
    echoes a secret. The CLI prints it and exits 2.
    """


class CommandError(ChatdError):
    """A command that cannot be carried out: answered with an ``error`` frame, socket stays open."""

    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: The ``ref`` of the command that failed, echoed in the error frame.
        self.ref = ref


class BackendUnavailable(CommandError):
    """The backend (Redis) did not answer: the command was not carried out."""

    def __init__(self, message: str = "backend unavailable, try again") -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


class CloseConnection(ChatdError):
    """The connection must be closed with ``code``; ``reason`` is sent to the client."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class AuthError(CloseConnection):
    """A credential was refused.

    ``reason`` is short and never echoes the credential (``token expired``, ``bad signature``).
    At the handshake it becomes HTTP 401 with ``http_code`` as the JSON ``code``; in a frame it
    becomes close ``code`` (4401 by default, 4403 for a disabled user, 4410 for a revoked session).
    """

    def __init__(
        self,
        reason: str,
        *,
        code: CloseCode = CloseCode.BAD_CREDENTIAL,
        http_code: str = "unauthorized",
    ) -> None:
        super().__init__(code, reason)
        self.http_code = http_code
