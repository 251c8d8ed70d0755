"""Shared fixtures: an in-process node on a real socket, and a client factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from chatd.server import Node
from tests.client import Client
from tests.nodes import issue, make_config, start_node

NodeFactory = Callable[..., Awaitable[Node]]
ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    """Close every test client, so no socket outlives its test (warnings are errors)."""
    yield
    await Client.close_all()


@pytest.fixture
async def node_factory(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Start in-process nodes with config overrides (``limits={"rate": 5}``); drained after."""
    nodes: list[Node] = []

    async def make(**sections: Any) -> Node:
        node = await start_node(make_config(tmp_path / f"state{len(nodes)}", **sections))
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if not node.draining:
            await node.drain()


@pytest.fixture
async def node(node_factory: NodeFactory) -> Node:
    return await node_factory()


@pytest.fixture
async def connect(node: Node) -> AsyncIterator[ClientFactory]:
    """Connect as ``user`` with a handshake token (or ``token=`` / ``query=`` as given)."""
    clients: list[Client] = []

    async def make(user: str | None = "alice", *, token: str | None = None, welcome: bool = True,
                   target: Node | None = None, **kwargs: Any) -> Client:
        port = (target or node).port
        url = f"ws://127.0.0.1:{port}/ws"
        if user is not None or token is not None:
            url += f"?token={token or issue(user or 'alice')}"
        c = await Client.open(url, **kwargs)
        clients.append(c)
        if welcome and (user is not None or token is not None):
            frame = await c.recv()
            assert frame["type"] == "welcome", frame
        return c

    yield make
    for c in clients:
        await c.close()
