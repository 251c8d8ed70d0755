"""Fixtures for the backend tests: a real ``redis-server`` per test, "nodes" of a backend, and a
recording FeedHandler that tests wait on (with deadlines, never by sleeping).

A *cluster* is what the contract suite runs against, parametrised ``memory`` / ``redis``:

- ``redis``: every :meth:`Cluster.node` is a separate backend instance (its own client, feed
  connection and presence heartbeat) on one private Redis, i.e. a separate chatd node;
- ``memory``: the embedded backend is a single node, so every :meth:`Cluster.node` is that node.

Cross-node assertions are written so they hold for both: "each node receives the frame once" is
"the one node receives it once" on ``memory``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chatd.backends.base import Backend, CloseMatching
from chatd.backends.memory import create_memory_backend
from chatd.backends.redis import create_redis_backend
from chatd.backends.sqlite.state import SqliteState
from chatd.config import (
    Config,
    Duration,
    HistoryConfig,
    PresenceConfig,
    RedisConfig,
    ServerConfig,
)
from tests.redis_server import RedisServer

#: The default: long enough for bursts of concurrent commands on a loaded 2-core CI machine.
#: Fault tests that measure how fast trouble is noticed use a shorter one.
COMMAND_TIMEOUT = 2.0
PROBE_INTERVAL = 0.1
PRESENCE_TTL = 1.0
MAX_PER_ROOM = 20
#: Generous deadline for events that normally take milliseconds.
DEADLINE = 5.0


@dataclass
class Event:
    kind: str  # room | user | control | lost
    target: str = ""
    msg_id: str | None = None
    frame: bytes = b""
    origin: str = ""
    control: CloseMatching | None = None
    rooms: frozenset[str] = frozenset()


@dataclass
class Recorder:
    """A FeedHandler that records every call; tests wait for what they expect."""

    name: str = ""
    events: list[Event] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _add(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def room_frame(self, room: str, msg_id: str | None, frame: bytes) -> None:
        assert isinstance(frame, bytes)
        self._add(Event("room", room, msg_id, frame))

    def user_frame(self, user: str, msg_id: str, frame: bytes, origin: str) -> None:
        assert isinstance(frame, bytes)
        self._add(Event("user", user, msg_id, frame, origin))

    def control(self, event: CloseMatching) -> None:
        self._add(Event("control", control=event))

    def feed_lost(self, rooms: frozenset[str]) -> None:
        self._add(Event("lost", rooms=rooms))

    def of(self, kind: str, target: str | None = None) -> list[Event]:
        return [e for e in self.events
                if e.kind == kind and (target is None or e.target == target)]

    async def wait_for(self, predicate: Callable[[Recorder], Any],
                       timeout: float = DEADLINE) -> Any:
        """Wait until ``predicate(self)`` is truthy; returns its value; fails at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self)
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: condition not met within {timeout} s; "
                                     f"events: {self.events[-10:]}")
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                pass


async def eventually(predicate: Callable[[], Any], timeout: float = DEADLINE,
                     interval: float = 0.02) -> Any:
    """Poll ``predicate`` (sync or async) until truthy, failing at the deadline.

    For state that no event announces (a Redis TTL running out, ``healthy()`` flipping).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def backend_config(url: str = "", *, node_id: str = "n", prefix: str = "chatd:",
                   max_per_room: int = MAX_PER_ROOM, presence_ttl: float = PRESENCE_TTL,
                   command_timeout: float = COMMAND_TIMEOUT,
                   probe_interval: float = PROBE_INTERVAL) -> Config:
    """A Config built directly (not through ``load``) so tests may use sub-second TTLs."""
    return Config(
        server=ServerConfig(node_id=node_id),
        history=HistoryConfig(max_per_room=max_per_room, max_replay=max_per_room,
                              ttl=Duration(3600)),
        presence=PresenceConfig(ttl=Duration(presence_ttl)),
        redis=RedisConfig(url=url, prefix=prefix, command_timeout=Duration(command_timeout),
                          probe_interval=Duration(probe_interval)),
    )


@dataclass
class BackendNode:
    backend: Backend
    recorder: Recorder

    @property
    def broker(self) -> Any:
        return self.backend.broker

    @property
    def presence(self) -> Any:
        return self.backend.presence


class Cluster:
    """Nodes of one backend kind sharing one store (see the module docstring)."""

    def __init__(self, kind: str, tmp_path: Path, redis: RedisServer | None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.redis = redis
        self.nodes: list[BackendNode] = []
        self.states: list[SqliteState] = []

    @property
    def multi_node(self) -> bool:
        return self.kind == "redis"

    async def node(self, **config: Any) -> BackendNode:
        """A started node (on ``memory``: the single node, created on first call)."""
        if self.kind == "memory" and self.nodes:
            return self.nodes[0]
        return await self.new_node(**config)

    async def new_node(self, **config: Any) -> BackendNode:
        """A node that starts afresh (``memory``: a new process, history and all)."""
        n = len(self.nodes)
        if self.kind == "redis":
            assert self.redis is not None
            cfg = backend_config(self.redis.url, node_id=f"n{n}", **config)
            backend = create_redis_backend(cfg, linger=0.05)
        else:
            state = SqliteState.open(self.tmp_path / f"state{n}" / "chatd.sqlite3")
            self.states.append(state)
            backend = create_memory_backend(backend_config(**config), state)
        node = BackendNode(backend, Recorder(name=f"{self.kind}-n{n}"))
        await backend.broker.start(node.recorder)
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            await node.backend.broker.close()
        for state in self.states:
            state.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private ``redis-server`` (no persistence) on a free port; fails if it is missing."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    server = None
    if request.param == "redis":
        server = RedisServer(tmp_path / "redis").start()
    c = Cluster(request.param, tmp_path, server)
    try:
        yield c
    finally:
        await c.close()
        if server is not None:
            server.close()
