"""One harness WebSocket connection: websockets' sans-I/O client inside an asyncio protocol.

The harness opens thousands of connections per process and receives tens of thousands of frames
per second, so its cost per frame decides whether the *client* becomes the bottleneck of a
benchmark. ``websockets.asyncio.client`` wakes a task per message; here the library's sans-I/O
:class:`websockets.client.ClientProtocol` does the handshake and the framing (no hand-written
WebSocket code), and every text frame is handed synchronously to a callback from
``data_received``: about 3 us per frame instead of a task switch.

Sockets are created here rather than by ``loop.create_connection(host, port)`` so that each one can
bind its own source address in 127.0.0.0/8 with ``IP_BIND_ADDRESS_NO_PORT`` (the port is then
picked at ``connect()`` time per destination, so each source address offers the whole ephemeral
range), and so that a slow consumer can shrink ``SO_RCVBUF`` before the window is negotiated.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable
from typing import Any

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

#: Linux's IP_BIND_ADDRESS_NO_PORT (not exported by the socket module on every Python).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

_TEXT = Opcode.TEXT
_CONT = Opcode.CONT
_OPEN = State.OPEN


class ConnectFailed(Exception):
    """The connection never became a WebSocket; ``reason`` is a short label for the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failure_reason(exc: BaseException) -> str:
    """A short, aggregatable label for why a connection failed (``http 401``, ``EMFILE``)."""
    if isinstance(exc, ConnectFailed):
        return exc.reason
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return f"{name} (file descriptor limit)"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{name} (out of ephemeral ports: use more --source-addrs)"
        return name
    return type(exc).__name__


class Client(asyncio.Protocol):
    """A WebSocket client connection whose frames are processed inside ``data_received``.

    Args:
        url: the ``ws://`` URL including path and query (the token, when passed in the query).
        on_text: called with the payload of every text message, synchronously.
        max_size: largest message accepted.
    """

    __slots__ = (
        "_abort_handle",
        "_fragments",
        "_opened",
        "close_code",
        "close_reason",
        "closed",
        "on_text",
        "protocol",
        "transport",
    )

    def __init__(
        self, url: str, on_text: Callable[[bytes], None], max_size: int = 1 << 20
    ) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=max_size)
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self._opened: asyncio.Future[None] = loop.create_future()
        #: Resolved when the TCP connection is gone, whatever the reason.
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self._fragments: list[bytes] | None = None
        self._abort_handle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = transport  # type: ignore[assignment]
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if not isinstance(event, Frame):
                if isinstance(event, Response):
                    self._handshake_done(event)
                continue
            opcode = event.opcode
            if opcode is _TEXT:
                if event.fin:
                    self.on_text(bytes(event.data))
                else:
                    self._fragments = [bytes(event.data)]
            elif opcode is _CONT and self._fragments is not None:
                self._fragments.append(bytes(event.data))
                if event.fin:
                    data_, self._fragments = b"".join(self._fragments), None
                    self.on_text(data_)
        self._flush()
        if protocol.close_expected():
            self._schedule_abort()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_handle is not None:
            self._abort_handle.cancel()
        rcvd = self.protocol.close_rcvd
        if rcvd is not None:
            self.close_code, self.close_reason = rcvd.code, rcvd.reason
        elif self.close_code is None:
            self.close_code = 1006
            self.close_reason = failure_reason(exc) if exc is not None else "connection lost"
        if not self._opened.done():
            self._opened.set_exception(ConnectFailed(self._lost_reason(exc)))
            self._opened.exception()  # mark retrieved: the opener may already have given up
        if not self.closed.done():
            self.closed.set_result(None)

    # -- helpers ------------------------------------------------------------------------

    def _lost_reason(self, exc: Exception | None) -> str:
        if self.protocol.close_rcvd is not None:
            return f"close {self.protocol.close_rcvd.code}"
        return failure_reason(exc) if exc is not None else "closed during handshake"

    def _handshake_done(self, response: Response) -> None:
        if self._opened.done():
            return
        exc = self.protocol.handshake_exc
        if exc is None:
            self._opened.set_result(None)
            return
        if isinstance(exc, InvalidStatus):
            body = exc.response.body.decode(errors="replace") if exc.response.body else ""
            code = ""
            if '"code"' in body:
                code = body.split('"code"', 1)[1].split('"')[1]
            label = f"http {exc.response.status_code}" + (f" {code}" if code else "")
        else:
            label = f"handshake: {type(exc).__name__}"
        self._opened.set_exception(ConnectFailed(label))

    def _flush(self) -> None:
        transport = self.transport
        data_to_send = self.protocol.data_to_send()
        if transport is None or transport.is_closing():
            return  # the connection is gone (connection_lost may not have run yet)
        for data in data_to_send:
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()

    def _schedule_abort(self) -> None:
        if self._abort_handle is None and self.transport is not None:
            loop = asyncio.get_running_loop()
            self._abort_handle = loop.call_later(2.0, self.transport.abort)

    # -- API ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.protocol.state is _OPEN

    async def wait_open(self) -> None:
        """Wait for the HTTP 101 answer; raises :class:`ConnectFailed` otherwise."""
        await self._opened

    def send(self, payload: bytes) -> None:
        """Send one text frame (already UTF-8 JSON); dropped once the connection is closing."""
        if self.protocol.state is _OPEN:
            self.protocol.send_text(payload)
            self._flush()

    def pause_reading(self) -> None:
        """Stop reading from the socket: this connection becomes a slow consumer."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self, code: int = 1000) -> None:
        """Start the closing handshake; the transport is aborted if it does not finish in 2 s."""
        if self.protocol.state is _OPEN:
            self.protocol.send_close(code)
            self._flush()
            self._schedule_abort()
        elif self.transport is not None and not self.closed.done():
            self.transport.abort()


def make_socket(
    family: int, local_host: str | None, rcvbuf: int | None
) -> socket.socket:
    """A non-blocking TCP socket, optionally bound to ``local_host`` with a small receive buffer."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            # Loopback's MSS is ~64 KiB, and Linux sizes the server's send buffer from the MSS
            # (about 20 segments at first): megabytes per socket, which would hide a slow
            # consumer from the server for a long time. A network-sized MSS restores the usual
            # tens of kilobytes.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
        if local_host:
            with contextlib.suppress(OSError):  # not Linux: ports are then per address
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((local_host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_client(
    url: str,
    address: tuple[str, int],
    on_text: Callable[[bytes], None],
    *,
    local_host: str | None = None,
    rcvbuf: int | None = None,
    family: int = socket.AF_INET,
) -> Client:
    """Connect and complete the WebSocket handshake (no authentication: see the worker).

    Args:
        url: the full ``ws://`` URL (path and query string are sent in the request).
        address: the resolved ``(ip, port)`` to connect to.
        on_text: the text-frame callback.
        local_host: source address to bind, e.g. ``127.0.0.7``.
        rcvbuf: ``SO_RCVBUF`` in bytes, for slow consumers.

    Raises:
        ConnectFailed, OSError, TimeoutError: the caller turns them into a failure label.
    """
    loop = asyncio.get_running_loop()
    sock = make_socket(family, local_host, rcvbuf)
    try:
        await loop.sock_connect(sock, address)
        _transport, client = await loop.create_connection(
            lambda: Client(url, on_text), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    try:
        await client.wait_open()
    except BaseException:
        client.close()
        raise
    return client


def resolve(url: str) -> tuple[int, tuple[Any, ...]]:
    """``(family, sockaddr)`` for a ``ws://`` URL, resolved once per run, not per connection."""
    uri = parse_uri(url)
    infos = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"cannot resolve {uri.host}")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr
