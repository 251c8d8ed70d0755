"""The thin asyncio shell: one chatd node.

It wires the sans-I/O core (protocol, session, hub, auth) to ``websockets`` and a backend:
HTTP endpoints and handshake checks (:mod:`chatd.handshake`), the connection lifecycle
(authenticate, command loop, clean-up), the backend feed
(:class:`~chatd.backends.base.FeedHandler`, room changes), and start / reload / drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from chatd import handshake, protocol
from chatd.auth.accounts import Accounts
from chatd.auth.keys import KeyRing
from chatd.auth.throttle import address_key
from chatd.auth.tokens import Claims, TokenIssuer, TokenVerifier
from chatd.backends.base import Backend, CloseMatching, RoomChange
from chatd.codes import CloseCode, ErrorCode
from chatd.commands import HANDLERS
from chatd.config import Config
from chatd.connection import Connection, text_frame
from chatd.core.rooms import Policies
from chatd.errors import AuthError, ChatdError, CloseConnection, CommandError
from chatd.hub import Hub
from chatd.metrics import Metrics
from chatd.ratelimit import KeyedTokenBuckets
from chatd.room_handlers import apply_room_change
from chatd.room_service import RoomService
from chatd.session import Session

log = logging.getLogger("chatd")


class Node:
    """A chatd node: its config, backend, local hub and open connections.

    Args:
        config: validated configuration.
        backend: the embedded or Redis backend (not yet started).
        keyring: JWT keys (verification, and signing for login/refresh).
        clock: unix seconds (injectable for expiry tests).
    """

    def __init__(self, config: Config, backend: Backend, keyring: KeyRing,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.backend = backend
        self.clock = clock
        self.log = log
        self.metrics = Metrics()
        self.hub = Hub(text_frame)
        self.set_keys(keyring)
        self.accounts = Accounts.for_node(self)
        self.rooms = RoomService(backend.rooms, Policies(config.rooms.namespaces),
                                 notify=backend.broker.publish_room_change, clock=clock)
        #: Background work started from sync callbacks (room changes), kept until done.
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: Server | None = None
        self.draining = False
        self.connections: set[Connection] = set()
        self.unauthenticated: Counter[str] = Counter()
        # Weak: a handshake refused after its token was checked (server closing, peer gone,
        # open_timeout) never reaches handler(), and must not leave its entry behind.
        self.handshake_claims: weakref.WeakKeyDictionary[ServerConnection, Claims] = \
            weakref.WeakKeyDictionary()
        self.accept_buckets = KeyedTokenBuckets()  # server.accept_rate_per_address
        self.on_change: Callable[[], None] | None = None

    # -- configuration -----------------------------------------------------------------------

    def set_keys(self, keyring: KeyRing) -> None:
        a = self.config.auth
        self.keyring = keyring
        self.verifier = TokenVerifier(keyring, leeway=a.leeway, issuer=a.issuer,
                                      audience=a.audience, clock=self.clock)
        self.issuer = TokenIssuer(keyring, issuer=a.issuer, audience=a.audience,
                                  clock=self.clock)

    def apply(self, config: Config, keyring: KeyRing) -> None:
        """Take a reloaded config: keys, origins, limits, log level. Connections stay open."""
        self.config = config
        self.set_keys(keyring)
        self.rooms.policies = Policies(config.rooms.namespaces)  # for joins from now on
        for conn in self.connections:
            conn.max_outbound = config.limits.max_outbound_bytes
            conn.session.limits = config.limits
        self._size_send_buffers()

    def _size_send_buffers(self) -> None:
        """Fix the kernel send buffer of connections accepted from now on.

        Set on the listening sockets: accepted sockets inherit it (Linux). Left to autotuning,
        the kernel grows a busy socket's buffer up to ``tcp_wmem``'s maximum (4 MiB), and a
        client that stops reading can hide that much there before ``max_outbound_bytes`` sees
        anything: slow consumers are then noticed late, and 10,000 of them could pin gigabytes
        of kernel memory.
        """
        size = self.config.limits.socket_send_buffer
        if size and self.server is not None:
            for sock in self.server.sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> Server:
        """Start the backend, then listen (on ``sock`` when socket-activated)."""
        s = self.config.server
        await self.backend.broker.start(self)
        where: dict[str, Any] = {"sock": sock} if sock is not None else {
            "host": s.host, "port": s.port}
        self.server = await serve(
            self.handler,
            process_request=self.process_request,
            compression=None,
            max_size=self.config.limits.max_frame_bytes,
            ping_interval=s.ping_interval or None,
            ping_timeout=s.ping_timeout or None,
            open_timeout=s.open_timeout,
            close_timeout=min(s.shutdown_timeout, 10.0),
            backlog=s.backlog,
            server_header="chatd",
            create_connection=_bounded_connection(self),
            **where,
        )
        self._size_send_buffers()
        return self.server

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def ready(self) -> bool:
        return self.server is not None and not self.draining and self.backend.broker.healthy()

    async def drain(self) -> None:
        """Graceful shutdown, bounded by ``server.shutdown_timeout``.

        Not ready at once (``/readyz`` and new handshakes answer 503 while the listener stays
        open, so a load balancer sees the node leave), 1001 to every client spread over
        ``server.drain_window`` (thousands must not reconnect in the same instant), then the
        listener closes, presence entries are removed and the backend is closed.
        """
        self.draining = True
        s = self.config.server
        conns = list(self.connections)
        log.info("draining", extra={"f": {"connections": len(conns)}})
        batches = max(1, min(len(conns), 20))
        step = s.drain_window / batches if conns else 0.0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(s.shutdown_timeout):
                for i in range(batches):
                    for conn in conns[i::batches]:
                        conn.close(CloseCode.GOING_AWAY, "server shutting down")
                    if step and i < batches - 1:
                        await asyncio.sleep(step)  # spreading reconnects, not synchronising
                if self.server is not None:
                    self.server.close(close_connections=True)
                    await self.server.wait_closed()
        with contextlib.suppress(ChatdError):
            await self.backend.presence.drain()
        await self.backend.broker.close()
        self.backend.state.close()
        self.accounts.passwords.close()
        log.info("stopped")

    # -- HTTP and handshake ------------------------------------------------------------------

    async def process_request(self, ws: ServerConnection, request: Any) -> Any:
        try:
            return await handshake.process_request(self, ws, request)
        except Exception:
            # A bug: log it with an incident id (websockets' own logger is silenced) and answer
            # 500 without details.
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error in handshake", extra={"f": {"incident": incident}})
            return handshake.json_error(500, "internal", f"internal error (incident {incident})")

    async def verify_token(self, token: str, *, in_band: bool = False) -> Claims:
        """Verify an access token and check revocation; raises AuthError."""
        try:
            claims = self.verifier.verify(token)
            if claims.exp + self.config.auth.expiry_grace <= self.clock():
                # Within the JWT leeway but past what a live connection may use (contract:
                # closed expiry_grace after exp): refuse now rather than close right after
                # the welcome.
                raise AuthError("token expired", http_code="token_expired")
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            if in_band:
                raise CommandError(ErrorCode.FORBIDDEN, f"token refused: {exc.reason}") from None
            raise
        try:
            await self.accounts.admit(claims)
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            if in_band:
                raise CommandError(ErrorCode.FORBIDDEN, f"token refused: {exc.reason}") from None
            raise
        return claims

    # -- connections -------------------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        addr = handshake.client_address(ws, self.config.server.trusted_proxies)
        conn = Connection(ws, Session(self.config.limits), self.config.node_id, addr,
                          self.config.limits.max_outbound_bytes, self._closed_by_server)
        self.connections.add(conn)
        self.metrics.connections.inc()
        claims = self.handshake_claims.pop(ws, None)
        authenticated = False
        try:
            if claims is not None:
                await self.authenticated(conn, claims, None)
            else:
                # Counted per /64 for IPv6, like the accept rate (one subscriber's block).
                block = address_key(addr)
                self.unauthenticated[block] += 1
                try:
                    claims, extra = await self.first_frame(conn)
                finally:
                    _release(self.unauthenticated, block)
                await self.authenticated(conn, claims, extra)
            authenticated = True
            async for data in ws:
                await self.dispatch(conn, data)
        except CloseConnection as exc:
            # Close here, not in a task: when the handler returns, websockets would close first
            # with 1000 and the client would never see why.
            await conn.close_now(exc.code, exc.reason)
            if isinstance(exc, AuthError):
                log.info("auth refused", extra={"f": {"conn": conn.conn_id, "addr": addr,
                                                      "reason": exc.reason}})
        except CommandError as exc:
            # Only before the command loop (which answers errors itself): the backend could not
            # check the credential or register the connection. Nothing was set up; retry later.
            await conn.close_now(CloseCode.TRY_AGAIN_LATER, exc.message)
        except ConnectionClosed:
            pass
        finally:
            await self.cleanup(conn, authenticated)
            code = ws.close_code
            log.info("close", extra={"f": {"conn": conn.conn_id, "user": conn.user or None,
                                           "code": code, "reason": ws.close_reason or None}})

    async def first_frame(self, conn: Connection) -> tuple[Claims, dict[str, Any] | None]:
        """Authenticate from the first frame within ``auth.timeout`` (contract section 2)."""
        try:
            async with asyncio.timeout(self.config.auth.timeout):
                data = await conn.ws.recv()
        except TimeoutError:
            raise CloseConnection(CloseCode.AUTH_TIMEOUT, "authentication timeout") from None
        cmd = conn.session.receive(data)
        if cmd.type == "auth":
            return await self.verify_token(cmd.args["token"]), None
        if cmd.type == "login":
            return await self.login(cmd.args, conn)
        return await self.refresh(cmd.args["refresh_token"], conn)

    async def authenticated(self, conn: Connection, claims: Claims,
                            extra: dict[str, Any] | None) -> None:
        limit = self.config.limits.max_connections_per_user
        if self.hub.user_count(claims.sub) >= limit:
            raise CloseConnection(CloseCode.TRY_AGAIN_LATER,
                                  f"too many connections for this user (max {limit})")
        self.bind(conn, claims)
        conn.session.authenticated(claims)
        await self.backend.broker.subscribe_user(conn.user)
        try:
            await self.backend.state.note_seen(conn.user)
        except BaseException:
            self.backend.broker.release_user(conn.user)
            raise
        self.hub.add(conn)
        self.metrics.authenticated.inc()
        self.metrics.users.set(self.hub.users)
        conn.send(protocol.welcome(user=conn.user, session=claims.sid or conn.conn_id,
                                   node=self.config.node_id, expires_at=int(claims.exp),
                                   tokens=extra))
        log.info("connect", extra={"f": {"conn": conn.conn_id, "user": conn.user,
                                         "addr": conn.addr}})
        if self.on_change is not None:
            self.on_change()

    def bind(self, conn: Connection, claims: Claims) -> None:
        """(Re)bind identity and arm the expiry timer: ``exp + auth.expiry_grace``."""
        conn.bind(claims)
        if conn.expiry is not None:
            conn.expiry.cancel()
        loop = asyncio.get_running_loop()
        delay = claims.exp + self.config.auth.expiry_grace - self.clock()
        conn.expiry = loop.call_later(max(delay, 0.0), conn.close, CloseCode.TOKEN_EXPIRED,
                                      "token expired")

    async def dispatch(self, conn: Connection, data: str | bytes) -> None:
        """Run one frame of a ready connection; every failure becomes an answer or a close."""
        self.metrics.messages_in.inc()
        cmd: protocol.Command | None = None
        try:
            cmd = conn.session.receive(data)
            await HANDLERS[cmd.type](self, conn, cmd)
        except CommandError as exc:
            self.metrics.errors.labels(exc.code.value).inc()
            ref = exc.ref if exc.ref is not None or cmd is None else cmd.ref
            conn.send(protocol.error(exc.code, exc.message, ref))
        except (CloseConnection, ConnectionClosed):
            raise
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error", extra={"f": {"incident": incident,
                                                         "conn": conn.conn_id}})
            self.metrics.errors.labels("internal").inc()
            conn.send(protocol.error(ErrorCode.INTERNAL, f"internal error (incident {incident})",
                                     cmd.ref if cmd is not None else None))

    async def leave_room(self, conn: Connection, room: str) -> None:
        """Undo a join: local registry, subscription reference, presence (never raises)."""
        self.hub.leave(room, conn)
        conn.session.left(room)
        await self.release_room(conn, room)

    async def release_room(self, conn: Connection, room: str) -> None:
        """The backend half of leaving, once ``conn`` is out of the hub and its session."""
        self.backend.broker.release_room(room)
        with contextlib.suppress(ChatdError):
            await self.backend.presence.leave(room, conn.user)
        self.metrics.rooms.set(self.hub.rooms)

    async def cleanup(self, conn: Connection, authenticated: bool) -> None:
        if conn.expiry is not None:
            conn.expiry.cancel()
        conn.closing = True
        conn.session.closed()
        self.connections.discard(conn)
        self.metrics.connections.dec()
        if authenticated:
            for room in list(conn.session.rooms):
                await self.leave_room(conn, room)
            self.hub.remove(conn)
            self.backend.broker.release_user(conn.user)
            self.metrics.authenticated.dec()
            self.metrics.users.set(self.hub.users)
        if self.on_change is not None:
            self.on_change()

    def _closed_by_server(self, code: int) -> None:
        self.metrics.closes.labels(str(code)).inc()

    # -- accounts (login, refresh, logout) -----------------------------------------------------

    async def login(self, args: dict[str, Any], conn: Connection
                    ) -> tuple[Claims, dict[str, Any] | None]:
        try:
            return await self.accounts.login(args["username"], args["password"], args["device"],
                                             conn.addr)
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            raise

    async def refresh(self, refresh_token: str, conn: Connection
                      ) -> tuple[Claims, dict[str, Any] | None]:
        """Rotate a refresh token, as a first frame or on a live connection (same user)."""
        try:
            return await self.accounts.refresh(refresh_token, user=conn.user or None)
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            raise

    async def logout(self, conn: Connection, *, everywhere: bool) -> None:
        """Revoke this session (or all of the user's): others close 4410, this one 1000."""
        claims = conn.session.claims
        assert claims is not None
        await self.accounts.logout(claims, everywhere=everywhere, conn_id=conn.conn_id)

    # -- FeedHandler: what the backend delivers ---------------------------------------------

    def room_frame(self, room: str, msg_id: str | None, frame: bytes) -> None:
        t0 = time.perf_counter()
        n = self.hub.deliver_room(room, msg_id, frame)
        if n:
            self.metrics.deliveries.inc(n)
            self.metrics.fanout.observe(time.perf_counter() - t0)

    def user_frame(self, user: str, msg_id: str, frame: bytes, origin: str) -> None:
        n = self.hub.deliver_user(user, frame, exclude=origin)
        if n:
            self.metrics.deliveries.inc(n)

    def room_change(self, change: RoomChange) -> None:
        apply_room_change(self, change)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def control(self, event: CloseMatching) -> None:
        for conn in list(self.hub.matching(event)):
            conn.close(event.code, event.reason)  # type: ignore[attr-defined]

    def feed_lost(self, rooms: frozenset[str]) -> None:
        """Frames may have been missed: every client must resume (close 4004).

        Direct messages travel on per-user channels that were interrupted too, so every
        authenticated connection is affected, not only room members.
        """
        conns = self.hub.all_members()
        log.warning("feed lost", extra={"f": {"rooms": len(rooms), "connections": len(conns)}})
        for conn in conns:
            conn.close(CloseCode.FEED_LOST, "backend feed lost, resume")  # type: ignore[attr-defined]


def _release(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _bounded_connection(node: Node) -> type[ServerConnection]:
    """``ServerConnection`` whose automatic replies obey ``limits.max_outbound_bytes`` too.

    ``websockets`` answers every ping with a pong as it reads, whatever its write buffer holds;
    a client that floods pings and never reads would make the node buffer without bound (one
    test measured 21 MB for 26 MB of pings). Past the limit such a client is cut off: it is
    not reading, so a close frame would never reach it.
    """

    class BoundedConnection(ServerConnection):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            transport = self.transport
            if transport.get_write_buffer_size() > node.config.limits.max_outbound_bytes:
                transport.abort()

    return BoundedConnection
