"""The ceiling: a bare broadcast server with the same libraries as chatd (websockets + uvloop).

It does the least a server can do and still be driven by the same scenarios as chatd: no
authentication (the user name is read, unverified, from the token's payload so direct messages
can be routed), no JSON parsing of messages, no history, no ids. Frames are recognised by their
first bytes, which the harness always writes the same way (``{"type":"send",...,"ref":"N"}``),
and answers are built by byte splicing:

- ``join``  -> the connection is added to the room; a fixed ``joined`` frame.
- ``send``  -> the client's own bytes with ``"send"`` replaced by ``"message"`` go to every member
  of the room (or every connection of the ``to`` user); an ``ack`` carrying the ``ref``.
- ``auth``/``login`` -> ``welcome``; ``ping`` -> ``pong``; anything else is ignored.

Fan-out (``--fanout``): ``broadcast`` (default) is ``websockets.asyncio.server.broadcast()``, the
library's own bare broadcast; ``frame`` frames the message once and writes the same bytes to every
transport, the cheapest thing Python can do. Both close a connection whose write buffer passes
``--max-outbound`` bytes with 4002, as chatd does, so the slow-consumer scenario means the same
thing on both servers.

Run: ``python -m loadtest.ceiling --port 8766`` (or ``python -m loadtest ceiling``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import signal
from collections.abc import Callable, Iterable
from http import HTTPStatus

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

_OPEN = State.OPEN
_SEND = b'{"type":"send"'
_JOIN = b'{"type":"join"'
_AUTH = (b'{"type":"auth"', b'{"type":"login"', b'{"type":"refresh"')
_PING = b'{"type":"ping"'
_MESSAGE = b'{"type":"message"'
_PONG = b'{"type":"pong"}'
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _field(data: bytes, name: bytes) -> bytes | None:
    """The string value of ``"name":"..."`` in ``data`` (no escapes: harness-made names)."""
    key = b'"' + name + b'":"'
    start = data.find(key)
    if start < 0:
        return None
    start += len(key)
    end = data.find(b'"', start)
    return data[start:end] if end >= 0 else None


def _unverified_sub(token: str) -> str:
    """The ``sub`` claim of a JWT, not verified: the ceiling has no authentication on purpose."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims.get("sub", "anonymous"))
    except (IndexError, ValueError, orjson.JSONDecodeError, AttributeError):
        return "anonymous"


class Ceiling:
    """Rooms and users of the ceiling server."""

    def __init__(self, fanout: str = "broadcast", max_outbound: int = 1 << 20) -> None:
        self.fanout = fanout
        self.max_outbound = max_outbound
        self.rooms: dict[bytes, set[ServerConnection]] = {}
        self.users: dict[str, set[ServerConnection]] = {}
        #: connections closed as slow consumers (served as chatd_closes_total{code="4002"}).
        self.slow_closed = 0

    def deliver(self, conns: Iterable[ServerConnection], payload: bytes) -> None:
        conns = tuple(conns)
        limit = self.max_outbound
        if self.fanout == "frame":
            raw = Frame(Opcode.TEXT, payload).serialize(mask=False)
            for ws in conns:
                if ws.protocol.state is _OPEN:
                    transport = ws.transport
                    transport.write(raw)
                    if transport.get_write_buffer_size() > limit:
                        self.slow(ws)
        else:
            broadcast(conns, payload, text=True)
            for ws in conns:
                if ws.transport.get_write_buffer_size() > limit:
                    self.slow(ws)

    def slow(self, ws: ServerConnection) -> None:
        if ws.protocol.state is _OPEN:
            for members in self.rooms.values():
                members.discard(ws)
            self.slow_closed += 1
            asyncio.get_running_loop().create_task(ws.close(4002, "slow consumer"))

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        query = ws.request.path.partition("?")[2]
        token = next((v for k, _, v in (p.partition("=") for p in query.split("&"))
                      if k == "token"), "")
        user = ""
        joined: list[bytes] = []
        if token:
            user = _unverified_sub(token)
            await self.welcome(ws, user)
        try:
            while True:
                data = await ws.recv(decode=False)
                if isinstance(data, str):  # pragma: no cover - decode=False gives bytes
                    data = data.encode()
                if data.startswith(_SEND):
                    self.on_send(ws, data)
                elif data.startswith(_JOIN):
                    room = _field(data, b"room") or b""
                    self.rooms.setdefault(room, set()).add(ws)
                    joined.append(room)
                    ref = _field(data, b"ref")
                    tail = b',"ref":"' + ref + b'"}' if ref is not None else b"}"
                    await ws.send(b'{"type":"joined","room":"' + room
                                  + b'","members":[],"history":[],"recovered":false' + tail,
                                  text=True)
                elif data.startswith(_AUTH) and not user:
                    user = (_field(data, b"username") or b"").decode() or _unverified_sub(
                        (_field(data, b"token") or b"").decode())
                    await self.welcome(ws, user)
                elif data.startswith(_PING):
                    await ws.send(_PONG, text=True)
        except ConnectionClosed:
            pass
        finally:
            for room in joined:
                members = self.rooms.get(room)
                if members is not None:
                    members.discard(ws)
                    if not members:
                        del self.rooms[room]
            conns = self.users.get(user)
            if conns is not None:
                conns.discard(ws)
                if not conns:
                    del self.users[user]

    async def welcome(self, ws: ServerConnection, user: str) -> None:
        self.users.setdefault(user, set()).add(ws)
        await ws.send(orjson.dumps({"type": "welcome", "user": user, "session": "ceiling",
                                    "node": "ceiling", "expires_at": 0, "protocol": 1}),
                      text=True)

    def on_send(self, ws: ServerConnection, data: bytes) -> None:
        message = _MESSAGE + data[len(_SEND):]
        room = _field(data, b"room")
        if room is not None:
            members = self.rooms.get(room)
            if members:
                self.deliver(members, message)
        else:
            to = _field(data, b"to")
            if to is not None:
                self.deliver(self.users.get(to.decode(), ()), message)
        at = data.rfind(b'"ref":')
        if at >= 0:
            ack = b'{"type":"ack","ref":' + data[at + 6 : -1] + b',"id":"0-0"}'
            if ws.protocol.state is _OPEN:
                ws.protocol.send_text(ack)
                ws.send_data()


def _metrics(ceiling: Ceiling) -> str:
    with open("/proc/self/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss = int(fields[21]) * PAGE
    return (
        "# TYPE process_cpu_seconds_total counter\n"
        f"process_cpu_seconds_total {cpu}\n"
        "# TYPE process_resident_memory_bytes gauge\n"
        f"process_resident_memory_bytes {rss}\n"
        "# TYPE chatd_closes_total counter\n"
        f'chatd_closes_total{{code="4002"}} {ceiling.slow_closed}\n'
    )


def make_process_request(
    ceiling: Ceiling,
) -> Callable[[ServerConnection, Request], Response | None]:
    """Health and metrics on the same port, like chatd; 404 for paths other than /ws."""

    def process_request(ws: ServerConnection, request: Request) -> Response | None:
        return _answer(ceiling, ws, request)

    return process_request


def _answer(ceiling: Ceiling, ws: ServerConnection, request: Request) -> Response | None:
    path = request.path.partition("?")[0]
    if path == "/ws":
        return None
    if path == "/healthz":
        return ws.respond(HTTPStatus.OK, "ok\n")
    if path == "/metrics":
        return ws.respond(HTTPStatus.OK, _metrics(ceiling))
    return ws.respond(HTTPStatus.NOT_FOUND, "not found\n")


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def serve_forever(host: str, port: int, fanout: str, max_outbound: int,
                        ready: asyncio.Future[int] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation)."""
    ceiling = Ceiling(fanout, max_outbound)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, _resolve, stop)
    async with serve(ceiling.handler, host, port, process_request=make_process_request(ceiling),
                     compression=None, max_size=65536, backlog=8192,
                     ping_interval=20, ping_timeout=20) as server:
        if ready is not None:
            ready.set_result(server.sockets[0].getsockname()[1])
        await stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ceiling",
                                     description="bare broadcast reference server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--fanout", choices=("broadcast", "frame"), default="broadcast")
    parser.add_argument("--max-outbound", type=int, default=1 << 20,
                        help="close a connection with 4002 past this many buffered bytes")
    args = parser.parse_args(argv)
    from loadtest.worker import raise_nofile

    raise_nofile()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        run(serve_forever(args.host, args.port, args.fanout, args.max_outbound))
    except OSError as exc:
        parser.exit(1, f"ceiling: cannot listen on {args.host}:{args.port}: {exc.strerror}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
