"""One WebSocket connection as the hub and the command handlers see it.

Outgoing frames bypass ``Connection.send()``: a fan-out frames its payload once and every
recipient gets the same bytes through :meth:`Connection.write`, one buffered transport write each.
That is safe because chatd never sends fragmented messages and compression is off, so the
``websockets`` protocol object keeps no per-frame state for outgoing data frames.

A connection whose transport buffer passes ``limits.max_outbound_bytes`` is a slow consumer: it
gets nothing more and is closed with 4002 (the close frame queues behind what it has not read;
``close_timeout`` later the transport is aborted), so its buffer is bounded.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from chatd.codes import CloseCode
from chatd.session import Session

if TYPE_CHECKING:
    from chatd.auth.tokens import Claims

_OPEN = State.OPEN
_ids = itertools.count(1)


def text_frame(payload: bytes) -> bytes:
    """The bytes of one unmasked, unfragmented text frame carrying ``payload``."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


class Connection:
    """A local connection: the socket, its :class:`Session`, and who it is."""

    __slots__ = ("addr", "closing", "conn_id", "expiry", "iat", "jti", "max_outbound",
                 "on_close", "session", "sid", "user", "ws")

    def __init__(self, ws: ServerConnection, session: Session, node_id: str, addr: str,
                 max_outbound: int, on_close: Callable[[int], None]) -> None:
        self.ws = ws
        self.session = session
        self.conn_id = f"{node_id}/{next(_ids)}"
        self.addr = addr
        self.max_outbound = max_outbound
        self.on_close = on_close
        self.user = ""
        self.sid: str | None = None
        self.jti = ""
        self.iat = 0.0
        self.closing = False
        self.expiry: asyncio.TimerHandle | None = None

    def bind(self, claims: Claims) -> None:
        """Take identity from a verified access token (at authentication or renewal)."""
        self.user = claims.sub
        self.sid = claims.sid
        self.jti = claims.jti
        self.iat = claims.iat

    def write(self, raw: bytes) -> None:
        """Queue one framed message; close the connection as a slow consumer past the limit."""
        if self.closing:
            return
        ws = self.ws
        if ws.protocol.state is not _OPEN:
            return
        transport = ws.transport
        transport.write(raw)
        if transport.get_write_buffer_size() > self.max_outbound:
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")

    def send(self, payload: bytes) -> None:
        """Send one frame to this connection only."""
        self.write(text_frame(payload))

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake once (from sync code); later writes are dropped."""
        if self._mark_closing(code):
            asyncio.get_running_loop().create_task(self.ws.close(code, reason))

    async def close_now(self, code: int, reason: str) -> None:
        """Close and wait for the closing handshake (from the connection's own handler)."""
        if self._mark_closing(code):
            await self.ws.close(code, reason)

    def _mark_closing(self, code: int) -> bool:
        if self.closing:
            return False
        self.closing = True
        if self.expiry is not None:
            self.expiry.cancel()
        self.on_close(code)
        return True
