"""Limits, bad input, HTTP endpoints and shutdown over real sockets."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from chatd.server import Node
from tests.client import Client
from tests.conftest import ClientFactory, NodeFactory
from tests.nodes import issue, make_config


def get(node: Node, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def http_get(node: Node, path: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(get, node, path)


async def status_of(address: str, **kwargs: object) -> int:
    with pytest.raises(InvalidStatus) as info:
        await Client.open(address, **kwargs)
    return info.value.response.status_code


async def test_flood_is_rate_limited_then_closed_4029(node_factory: NodeFactory,
                                                     connect: ClientFactory) -> None:
    node = await node_factory(limits={"rate": 1, "burst": 3, "max_rate_limited": 5})
    c = await connect("alice", target=node)
    for i in range(20):
        await c.send(type="ping", ref=f"p{i}")
    code, _ = await c.closed()
    assert code == 4029
    assert len(c.seen("pong")) == 3
    limited = c.seen("error", code="rate_limited")
    assert len(limited) == 4
    assert limited[0]["ref"] == "p3"


async def test_binary_frame_closes_1003(connect: ClientFactory) -> None:
    c = await connect("alice")
    await c.send_raw(b"\x00\x01")
    assert (await c.closed())[0] == 1003


async def test_oversized_frame_closes_1009(node_factory: NodeFactory,
                                           connect: ClientFactory) -> None:
    node = await node_factory(limits={"max_frame_bytes": 1024})
    c = await connect("alice", target=node, max_size=None)
    await c.send(type="ping", pad="x" * 2000)
    assert (await c.closed())[0] == 1009


async def test_invalid_json_is_bad_request_then_4400_after_too_many(
        node_factory: NodeFactory, connect: ClientFactory) -> None:
    node = await node_factory(limits={"max_bad_frames": 3})
    c = await connect("alice", target=node)
    await c.send_raw("{not json")
    assert (await c.recv())["code"] == "bad_request"
    await c.send_raw("[1, 2]")
    assert (await c.recv())["message"] == "frame must be a JSON object"
    assert (await c.request("ping", "pong"))["type"] == "pong"  # a good frame resets the count
    for _ in range(3):
        await c.send_raw("nope")
    assert (await c.closed())[0] == 4400


async def test_slow_consumer_is_closed_4002_while_others_keep_receiving(
        node_factory: NodeFactory, connect: ClientFactory) -> None:
    node = await node_factory(limits={"max_outbound_bytes": 65536, "rate": 100000,
                                      "burst": 100000})
    sender = await connect("alice", target=node)
    reader = await connect("bob", target=node)
    # A client that never reads: a raw socket with a tiny receive buffer, handshake by hand.
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", node.port))
    slow = await ws_connect(f"ws://127.0.0.1:{node.port}/ws?token={issue('carol')}", sock=raw,
                            compression=None, max_queue=1)
    await slow.recv()
    await slow.send(orjson.dumps({"type": "join", "room": "g"}).decode())
    await sender.request("join", "joined", room="g")
    await reader.request("join", "joined", room="g")
    while node.hub.members("g") < 3:
        await asyncio.sleep(0.01)
    slow_conn = next(c for c in node.connections if c.user == "carol")
    text = "x" * 4000
    sent = 0
    while not slow_conn.closing:
        await sender.send(type="send", room="g", text=text)
        sent += 1
        assert sent < 20000, "the slow consumer was never closed"
        if sent % 50 == 0:
            await sender.request("ping", "pong")
    assert node.metrics.closes.labels("4002")._value.get() == 1
    # Everyone else still gets every message.
    for _ in range(sent):
        await reader.expect("message")
    assert len(reader.seen("message")) == sent
    slow.transport.abort()


async def test_connections_get_the_configured_kernel_send_buffer_also_after_a_reload(
        node_factory: NodeFactory, connect: ClientFactory, tmp_path: Path) -> None:
    # Fixed rather than autotuned, a stalled client can hide at most this much in the kernel
    # before limits.max_outbound_bytes sees it (Linux reports twice the size set).
    node = await node_factory(limits={"socket_send_buffer": 65536})

    def send_buffer(user: str) -> int:
        conn = next(c for c in node.connections if c.user == user)
        sock = conn.ws.transport.get_extra_info("socket")
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    await connect("alice", target=node)
    assert send_buffer("alice") == 2 * 65536
    node.apply(make_config(tmp_path, limits={"socket_send_buffer": 32768}), node.keyring)
    await connect("bob", target=node)
    assert send_buffer("bob") == 2 * 32768
    assert send_buffer("alice") == 2 * 65536


async def test_node_full_answers_503_before_the_upgrade(node_factory: NodeFactory,
                                                       connect: ClientFactory) -> None:
    node = await node_factory(limits={"max_connections": 2})
    await connect("alice", target=node)
    await connect("bob", target=node)
    assert await status_of(f"ws://127.0.0.1:{node.port}/ws?token={issue('carol')}") == 503


async def test_too_many_connections_for_one_user_refuses_the_newest(
        node_factory: NodeFactory, connect: ClientFactory) -> None:
    node = await node_factory(limits={"max_connections_per_user": 2})
    first = await connect("alice", target=node)
    await connect("alice", target=node)
    assert await status_of(f"ws://127.0.0.1:{node.port}/ws?token={issue('alice')}") == 429
    late = await Client.open(f"ws://127.0.0.1:{node.port}/ws")
    await late.send(type="auth", token=issue("alice"))
    assert (await late.closed())[0] == 1013
    assert (await first.request("ping", "pong"))["type"] == "pong"


async def test_browser_origin_not_on_the_allowlist_is_refused_403(
        node_factory: NodeFactory) -> None:
    node = await node_factory(server={"allowed_origins": ["https://chat.example.com"]})
    base = f"ws://127.0.0.1:{node.port}/ws?token={issue('alice')}"
    assert await status_of(base, origin="https://evil.example") == 403
    ok = await Client.open(base, origin="https://chat.example.com")
    assert (await ok.recv())["type"] == "welcome"
    await ok.close()
    no_origin = await Client.open(base)  # non-browser clients send no Origin
    assert (await no_origin.recv())["type"] == "welcome"
    await no_origin.close()


async def test_health_ready_metrics_and_unknown_paths(node: Node, connect: ClientFactory) -> None:
    await connect("alice")
    assert await http_get(node, "/healthz") == (200, b"ok\n")
    assert await http_get(node, "/readyz") == (200, b"ready\n")
    status, body = await http_get(node, "/metrics")
    assert status == 200
    assert b"chatd_connections 1.0" in body
    assert b"chatd_fanout_seconds_bucket" in body
    assert (await http_get(node, "/nope"))[0] == 404
    assert await status_of(f"ws://127.0.0.1:{node.port}/other") == 404


async def test_metrics_are_refused_403_outside_the_allowlist(node_factory: NodeFactory) -> None:
    node = await node_factory(metrics={"allow": ["10.0.0.0/8"]})
    assert (await http_get(node, "/metrics"))[0] == 403


async def test_graceful_shutdown_closes_every_client_with_1001(node: Node,
                                                             connect: ClientFactory) -> None:
    clients = [await connect(f"user{i}") for i in range(5)]
    drained = asyncio.create_task(node.drain())
    for c in clients:
        assert (await c.closed())[0] == 1001
    await asyncio.wait_for(drained, 15)
    assert node.draining
