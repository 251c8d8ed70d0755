"""Everything answered over plain HTTP on the WebSocket port, before any upgrade.

``/healthz``, ``/readyz``, ``/metrics`` (contract section 8), 404 for unknown paths, and the
checks on a WebSocket handshake, cheapest first, so that hostile traffic costs as little as
possible (docs/security.md):

1. the per-address accept rate limit (HTTP 429 with ``Retry-After``), before anything else;
2. the upgrade request itself (method, ``Sec-WebSocket-Key``/``-Version``, duplicated headers):
   refused here with the status ``websockets`` would give, but *before* a token is verified or
   anything is remembered about the connection;
3. the Origin allowlist (cross-site WebSocket hijacking, HTTP 403), draining and capacity (503);
4. the unauthenticated-connection caps (503) or the handshake token (401/403/429).

Every request is answered by a status and a short body; nothing a client sends here can raise
(a raise would become a 500 and a traceback in the log).

The client address is the TCP peer, or, when the peer is one of ``server.trusted_proxies``, the
address that proxy reports in ``X-Forwarded-For`` (see :func:`forwarded_client`).
"""

from __future__ import annotations

import http
import ipaddress
import math
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, InvalidHeaderValue
from websockets.http11 import Request, Response

from chatd.auth.throttle import address_key
from chatd.errors import AuthError, BackendUnavailable

if TYPE_CHECKING:
    from chatd.server import Node

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_Net = ipaddress.IPv4Network | ipaddress.IPv6Network

#: X-Forwarded-For hops examined at most (a chain of trusted proxies longer than this is not
#: a deployment, it is a header someone made up).
MAX_FORWARDED_HOPS = 16


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
             extra: dict[str, str] | None = None) -> Response:
    headers = Headers({"Content-Type": content_type, "Content-Length": str(len(body)),
                       "Connection": "close", **(extra or {})})
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def json_error(status: int, code: str, message: str,
               extra: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"code": code, "message": message})
    return response(status, body, "application/json", extra)


# -- client addresses -------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _networks(allow: tuple[str, ...]) -> tuple[_Net, ...]:
    return tuple(ipaddress.ip_network(a, strict=False) for a in allow)


def _ip(text: str) -> _IP | None:
    """An address from a peer or an X-Forwarded-For hop (``[v6]:port`` and ``v4:port`` too)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def forwarded_client(peer: str, forwarded_for: Iterable[str], trusted: tuple[str, ...]) -> str:
    """The client address behind trusted reverse proxies.

    Each proxy appends the address it received the connection from, so the list is read from
    the right: the first hop that is not itself a trusted proxy is the client. Everything left
    of it was written by the client and proves nothing. A hop that is not an address (a proxy
    that forwards the client's header without appending) stops the walk at the last proxy
    known; when every hop is a trusted proxy, the leftmost one is the answer.

    Args:
        peer: the TCP peer's address.
        forwarded_for: every ``X-Forwarded-For`` header value, in order.
        trusted: ``server.trusted_proxies`` (addresses or networks).
    """
    nets = _networks(trusted)
    ip = _ip(peer)
    if not nets or ip is None or not any(ip in net for net in nets):
        return peer
    hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
    client = str(ip)
    for hop in reversed(hops[-MAX_FORWARDED_HOPS:]):
        ip = _ip(hop)
        if ip is None:
            return client
        client = str(ip)
        if not any(ip in net for net in nets):
            return client
    return client


def client_address(ws: ServerConnection, trusted_proxies: tuple[str, ...] = ()) -> str:
    """The client's address: the TCP peer, or what a trusted proxy says the client is.

    Per-address limits, login throttling, ``metrics.allow`` and the logs all use this.
    """
    peer = ws.remote_address
    addr = str(peer[0]) if peer else "?"
    request = ws.request
    if not trusted_proxies or request is None:
        return addr
    return forwarded_client(addr, request.headers.get_all("X-Forwarded-For"), trusted_proxies)


def address_allowed(addr: str, allow: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _networks(allow))


# -- the handshake ------------------------------------------------------------------------------


def _single(request: Request, name: str) -> tuple[str | None, bool]:
    """(value, ok): a header that may appear at most once; ok is False when it is repeated."""
    values = request.headers.get_all(name)
    if len(values) > 1:
        return None, False
    return (values[0] if values else None), True


def handshake_token(request: Request, query: str) -> str | None:
    """The access token from ``?token=`` or ``Authorization: Bearer`` (never logged)."""
    tokens = parse_qs(query).get("token")
    if tokens:
        return tokens[0]
    header, _ = _single(request, "Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def upgrade_refusal(ws: ServerConnection, request: Request) -> Response | None:
    """The answer to a request that is not a valid WebSocket upgrade, or None when it is.

    ``websockets`` would refuse it anyway, but only after :func:`process_request`: checking
    first means a malformed upgrade never costs a token verification and never leaves state
    behind for a connection that will not open. The statuses are the library's (400, 405,
    426, 505), except an unsupported ``Sec-WebSocket-Version``: RFC 6455 section 4.4 asks for
    426 with the versions the server speaks, so a client can retry with one of them.
    """
    try:
        ws.protocol.process_request(request)
    except InvalidHeaderValue as exc:
        if exc.name.lower() == "sec-websocket-version":
            return response(426, b"unsupported WebSocket version; this server speaks 13\n",
                            extra={"Sec-WebSocket-Version": "13", "Upgrade": "websocket"})
        return ws.protocol.accept(request)
    except InvalidHandshake:
        return ws.protocol.accept(request)  # its own refusal: the status and the reason
    return None


def _endpoint(node: Node, ws: ServerConnection, request: Request, path: str) -> Response:
    """``/healthz``, ``/readyz``, ``/metrics`` or 404 (plain HTTP, GET only)."""
    config = node.config
    if path not in ("/healthz", "/readyz", "/metrics"):
        return response(404, b"not found\n")
    if request.method != "GET":
        return response(405, b"method not allowed\n", extra={"Allow": "GET"})
    if path == "/healthz":
        return response(200, b"ok\n")
    if path == "/readyz":
        if node.ready():
            return response(200, b"ready\n")
        return response(503, b"draining\n" if node.draining else b"not ready\n")
    if not address_allowed(client_address(ws, config.server.trusted_proxies),
                           config.metrics.allow):
        return response(403, b"forbidden\n")
    node.metrics.backend_up.set(1 if node.backend.broker.healthy() else 0)
    return response(200, node.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")


async def process_request(node: Node, ws: ServerConnection, request: Request) -> Response | None:
    """Answer plain HTTP requests and vet WebSocket handshakes; None lets the upgrade proceed."""
    config = node.config
    s = config.server
    # Origin-form request targets only (what every WebSocket client sends); a fragment is
    # never sent. No URL parser here: it would raise on targets like "//[x".
    path, _, query = request.path.partition("?")
    if path != s.path:
        return _endpoint(node, ws, request, path)

    addr = client_address(ws, s.trusted_proxies)
    wait = node.accept_buckets.take(address_key(addr), rate=s.accept_rate_per_address,
                                    burst=s.accept_burst_per_address)
    if wait:
        return json_error(429, "rate_limited", "too many connection attempts from this address",
                          {"Retry-After": str(max(1, math.ceil(wait)))})
    refusal = upgrade_refusal(ws, request)
    if refusal is not None:
        return refusal
    origin, _ = _single(request, "Origin")  # a repeated Origin was refused just above
    allowed = s.allowed_origins
    if origin is not None and "*" not in allowed and origin not in allowed:
        node.metrics.auth_failures.labels("origin").inc()
        return json_error(403, "forbidden", "origin not allowed")
    if node.draining:
        return json_error(503, "unavailable", "server shutting down", {"Retry-After": "1"})
    if len(node.connections) >= config.limits.max_connections:
        return json_error(503, "unavailable", "node full", {"Retry-After": "5"})

    _, single = _single(request, "Authorization")
    if not single:
        return json_error(400, "bad_request", "more than one Authorization header")
    token = handshake_token(request, query)
    if token is None:
        if sum(node.unauthenticated.values()) >= s.max_unauthenticated or \
                node.unauthenticated[address_key(addr)] >= s.max_unauthenticated_per_address:
            return json_error(503, "unavailable", "too many unauthenticated connections",
                              {"Retry-After": "5"})
        return None
    if not config.auth.handshake_token:
        return json_error(401, "unauthorized",
                          "handshake tokens are disabled; send an auth frame instead")
    try:
        claims = await node.verify_token(token)
    except AuthError as exc:
        status = 403 if exc.http_code == "forbidden" else 401
        return json_error(status, exc.http_code, exc.reason)
    except BackendUnavailable as exc:
        return json_error(503, "unavailable", exc.message, {"Retry-After": "1"})
    limit = config.limits.max_connections_per_user
    if node.hub.user_count(claims.sub) >= limit:
        return json_error(429, "too_many_connections",
                          f"too many connections for this user (max {limit})")
    node.handshake_claims[ws] = claims
    return None
