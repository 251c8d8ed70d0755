"""Everything answered over plain HTTP on the WebSocket port, before any upgrade.

``/healthz``, ``/readyz``, ``/metrics`` (contract section 8), 404 for unknown paths, and the
checks on a WebSocket handshake: Origin allowlist (cross-site WebSocket hijacking), capacity,
and the handshake token (HTTP 401 with a JSON body before the upgrade).
"""

from __future__ import annotations

import http
import ipaddress
from functools import lru_cache
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chatd.errors import AuthError, BackendUnavailable

if TYPE_CHECKING:
    from chatd.server import Node


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
             extra: dict[str, str] | None = None) -> Response:
    headers = Headers({"Content-Type": content_type, "Content-Length": str(len(body)),
                       "Connection": "close", **(extra or {})})
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def json_error(status: int, code: str, message: str,
               extra: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"code": code, "message": message})
    return response(status, body, "application/json", extra)


def client_address(ws: ServerConnection) -> str:
    peer = ws.remote_address
    return str(peer[0]) if peer else "?"


@lru_cache(maxsize=16)
def _networks(allow: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(a, strict=False) for a in allow)


def address_allowed(addr: str, allow: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _networks(allow))


def handshake_token(request: Request, query: str) -> str | None:
    """The access token from ``?token=`` or ``Authorization: Bearer`` (never logged)."""
    tokens = parse_qs(query).get("token")
    if tokens:
        return tokens[0]
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


async def process_request(node: Node, ws: ServerConnection, request: Request) -> Response | None:
    """Answer plain HTTP requests and vet WebSocket handshakes; None lets the upgrade proceed."""
    parts = urlsplit(request.path)
    config = node.config
    if parts.path != config.server.path:
        if parts.path == "/healthz":
            return response(200, b"ok\n")
        if parts.path == "/readyz":
            if node.ready():
                return response(200, b"ready\n")
            return response(503, b"draining\n" if node.draining else b"not ready\n")
        if parts.path == "/metrics":
            if not address_allowed(client_address(ws), config.metrics.allow):
                return response(403, b"forbidden\n")
            node.metrics.backend_up.set(1 if node.backend.broker.healthy() else 0)
            return response(200, node.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        return response(404, b"not found\n")

    origin = request.headers.get("Origin")
    allowed = config.server.allowed_origins
    if origin is not None and "*" not in allowed and origin not in allowed:
        node.metrics.auth_failures.labels("origin").inc()
        return json_error(403, "forbidden", "origin not allowed")
    if node.draining:
        return json_error(503, "unavailable", "server shutting down", {"Retry-After": "1"})
    if len(node.connections) >= config.server.max_connections:
        return json_error(503, "unavailable", "node full", {"Retry-After": "5"})

    token = handshake_token(request, parts.query)
    if token is None:
        addr = client_address(ws)
        if sum(node.unauthenticated.values()) >= config.server.max_unauthenticated or \
                node.unauthenticated[addr] >= config.server.max_unauthenticated_per_address:
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
