"""The RoomStore contract (chatd.backends.base.RoomStore) on ``memory``, ``sqlite``, ``redis``.

Each test gets *nodes*: separate store instances on one store (``sqlite``: connections to one
file, as the server and ``chatd room`` are; ``redis``: separate clients on one real
redis-server, as separate chatd nodes are; ``memory``: one process, so every node is the one
store). What one node writes, every node reads. Persistence runs on the durable two only.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatd.backends.base import (
    Backend,
    CloseMatching,
    RoomChange,
    RoomInfo,
    RoomMember,
    RoomStanding,
    RoomStore,
)
from chatd.backends.memory.rooms import MemoryRooms
from chatd.backends.redis.client import Keys, create_client
from chatd.backends.redis.rooms import RedisRooms
from chatd.backends.sqlite.rooms import SqliteRooms
from chatd.backends.sqlite.state import SqliteState
from chatd.errors import BackendUnavailable
from tests.backends.conftest import Recorder, eventually
from tests.clock import Clock
from tests.redis_server import RedisServer

T0 = 1_800_000_000.0


class Nodes:
    """Store instances sharing one store; :meth:`node` makes another."""

    def __init__(self, kind: str, tmp_path: Path, clock: Clock,
                 server: RedisServer | None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.clock = clock
        self.server = server
        self.stores: list[RoomStore] = []
        self.clients: list[object] = []

    def node(self) -> RoomStore:
        store: RoomStore
        if self.kind == "memory":
            if not self.stores:
                self.stores.append(MemoryRooms(clock=self.clock))
            return self.stores[0]
        if self.kind == "sqlite":
            store = SqliteRooms.open(self.tmp_path / "state" / "chatd.sqlite3", clock=self.clock)
        else:
            assert self.server is not None
            client = create_client(self.server.url, 2.0)
            self.clients.append(client)
            store = RedisRooms(client, Keys("chatd:"), command_timeout=2.0, clock=self.clock)
        self.stores.append(store)
        return store

    async def close(self) -> None:
        for store in self.stores:
            store.close()
        for client in self.clients:
            await client.aclose()  # type: ignore[attr-defined]


async def _nodes(kind: str, tmp_path: Path) -> AsyncIterator[Nodes]:
    server = RedisServer(tmp_path / "redis").start() if kind == "redis" else None
    n = Nodes(kind, tmp_path, Clock(T0), server)
    try:
        yield n
    finally:
        await n.close()
        if server is not None:
            server.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Nodes]:
    async for n in _nodes(request.param, tmp_path):
        yield n


@pytest.fixture(params=["sqlite", "redis"])
async def durable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Nodes]:
    async for n in _nodes(request.param, tmp_path):
        yield n


# -- rooms --------------------------------------------------------------------------------------


async def test_a_room_is_created_once_with_its_owner_and_every_node_sees_it(nodes: Nodes) -> None:
    a, b = nodes.node(), nodes.node()
    assert await a.create("team:acme", "alice") is True
    assert await b.create("team:acme", "bob") is False
    assert await b.info("team:acme") == RoomInfo("team:acme", T0, "alice")
    assert await b.standing("team:acme", "alice") == RoomStanding(exists=True, role="owner")
    assert await b.standing("team:acme", "bob") == RoomStanding(exists=True)
    assert await a.standing("team:other", "alice") == RoomStanding()


async def test_a_room_created_by_an_operator_has_no_owner(nodes: Nodes) -> None:
    a = nodes.node()
    assert await a.create("team:ops", None) is True
    assert await a.info("team:ops") == RoomInfo("team:ops", T0, None)
    assert await a.members("team:ops", None, 10) == []


async def test_concurrent_creates_of_one_room_make_exactly_one_owner(nodes: Nodes) -> None:
    stores = [nodes.node() for _ in range(4)]
    results = await asyncio.gather(*(s.create("team:race", f"u{i}")
                                     for i, s in enumerate(stores)))
    assert sorted(results) == [False, False, False, True]
    winner = f"u{results.index(True)}"
    assert await stores[0].members("team:race", None, 10) == [RoomMember(winner, "owner")]


async def test_rooms_are_listed_in_name_order_page_by_page(nodes: Nodes) -> None:
    a = nodes.node()
    for name in ("team:c", "team:a", "support:1", "team:b"):
        await a.create(name, None)
    names = [r.name for r in await a.list_rooms(None, 10)]
    assert names == ["support:1", "team:a", "team:b", "team:c"]
    assert [r.name for r in await a.list_rooms("support:1", 2)] == ["team:a", "team:b"]
    assert await a.list_rooms("team:c", 10) == []
    assert await a.list_rooms(None, 0) == []


async def test_deleting_a_room_forgets_its_members_bans_and_mutes(nodes: Nodes) -> None:
    a, b = nodes.node(), nodes.node()
    await a.create("team:gone", "alice")
    await a.set_role("team:gone", "bob", "member")
    await a.restrict("team:gone", "carol", "ban", math.inf)
    await a.restrict("team:gone", "bob", "mute", math.inf)
    assert await b.delete("team:gone") is True
    assert await a.delete("team:gone") is False
    assert await a.info("team:gone") is None
    assert [r.name for r in await a.list_rooms(None, 10)] == []
    for user in ("alice", "bob", "carol"):
        assert await a.standing("team:gone", user) == RoomStanding()
    assert await a.create("team:gone", "dave") is True
    assert await a.members("team:gone", None, 10) == [RoomMember("dave", "owner")]


# -- member lists -------------------------------------------------------------------------------


async def test_roles_are_set_replaced_and_removed_on_every_node(nodes: Nodes) -> None:
    a, b = nodes.node(), nodes.node()
    await a.create("team:acme", "alice")
    await a.set_role("team:acme", "bob", "member")
    assert (await b.standing("team:acme", "bob")).role == "member"
    await b.set_role("team:acme", "bob", "moderator")
    assert (await a.standing("team:acme", "bob")).role == "moderator"
    assert await a.remove_member("team:acme", "bob") is True
    assert await b.remove_member("team:acme", "bob") is False
    assert (await b.standing("team:acme", "bob")).role is None


async def test_roles_may_be_stored_for_a_room_that_was_never_created(nodes: Nodes) -> None:
    a = nodes.node()
    await a.set_role("lobby", "mod", "moderator")
    assert await a.standing("lobby", "mod") == RoomStanding(exists=False, role="moderator")
    assert await a.list_rooms(None, 10) == []


async def test_the_member_list_pages_in_name_order(nodes: Nodes) -> None:
    a = nodes.node()
    await a.create("team:big", "owner1")
    names = [f"user{i:03d}" for i in range(250)]
    for name in reversed(names):
        await a.set_role("team:big", name, "member")
    pages: list[RoomMember] = []
    after = None
    while True:
        page = await a.members("team:big", after, 100)
        pages += page
        if len(page) < 100:
            break
        after = page[-1].user
    assert [m.user for m in pages] == ["owner1", *names]
    assert pages[0].role == "owner" and {m.role for m in pages[1:]} == {"member"}
    assert await a.members("team:big", "user249", 10) == []
    assert await a.members("team:big", None, 0) == []
    assert await a.members("team:none", None, 10) == []


# -- bans and mutes -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ban", "mute"])
async def test_a_restriction_with_a_duration_ends_by_itself_on_every_node(
        nodes: Nodes, kind: str) -> None:
    a, b = nodes.node(), nodes.node()
    field = "banned_until" if kind == "ban" else "muted_until"
    await a.restrict("lobby", "bob", kind, T0 + 60)
    assert getattr(await b.standing("lobby", "bob"), field) == T0 + 60
    nodes.clock.advance(59.9)
    assert getattr(await b.standing("lobby", "bob"), field) == T0 + 60
    nodes.clock.advance(0.1)
    assert getattr(await b.standing("lobby", "bob"), field) is None
    assert await a.lift("lobby", "bob", kind) is False


@pytest.mark.parametrize("kind", ["ban", "mute"])
async def test_a_restriction_without_a_duration_lasts_until_lifted(
        nodes: Nodes, kind: str) -> None:
    a, b = nodes.node(), nodes.node()
    field = "banned_until" if kind == "ban" else "muted_until"
    await a.restrict("team:acme", "bob", kind, math.inf)
    nodes.clock.advance(10 * 365 * 86400)
    assert getattr(await b.standing("team:acme", "bob"), field) == math.inf
    assert await b.lift("team:acme", "bob", kind) is True
    assert getattr(await a.standing("team:acme", "bob"), field) is None
    assert await a.lift("team:acme", "bob", kind) is False


async def test_bans_and_mutes_are_separate_and_per_room(nodes: Nodes) -> None:
    a = nodes.node()
    await a.restrict("r1", "bob", "ban", T0 + 10)
    await a.restrict("r1", "bob", "mute", T0 + 20)
    assert await a.standing("r1", "bob") == RoomStanding(banned_until=T0 + 10,
                                                         muted_until=T0 + 20)
    assert await a.standing("r2", "bob") == RoomStanding()
    assert await a.standing("r1", "carol") == RoomStanding()
    await a.lift("r1", "bob", "ban")
    assert await a.standing("r1", "bob") == RoomStanding(muted_until=T0 + 20)


async def test_a_new_restriction_replaces_the_old_one(nodes: Nodes) -> None:
    a = nodes.node()
    await a.restrict("r1", "bob", "ban", math.inf)
    await a.restrict("r1", "bob", "ban", T0 + 5)
    assert (await a.standing("r1", "bob")).banned_until == T0 + 5


async def test_an_unknown_restriction_kind_is_a_bug(nodes: Nodes) -> None:
    with pytest.raises(ValueError):
        await nodes.node().restrict("r1", "bob", "kick", math.inf)


# -- persistence --------------------------------------------------------------------------------


async def test_rooms_survive_a_restart_of_the_node(durable: Nodes) -> None:
    nodes = durable
    a = nodes.node()
    await a.create("team:acme", "alice")
    await a.set_role("team:acme", "bob", "moderator")
    await a.restrict("team:acme", "eve", "ban", math.inf)
    a.close()
    again = nodes.node()  # sqlite: a new connection after the old one closed (a restart)
    assert await again.info("team:acme") == RoomInfo("team:acme", T0, "alice")
    assert await again.members("team:acme", None, 10) == [RoomMember("alice", "owner"),
                                                           RoomMember("bob", "moderator")]
    assert (await again.standing("team:acme", "eve")).banned_until == math.inf


async def test_an_unreachable_store_answers_unavailable(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "gone").start()
    url = server.url
    server.close()
    client = create_client(url, 0.5)
    store = RedisRooms(client, Keys("chatd:"), command_timeout=0.5)
    try:
        with pytest.raises(BackendUnavailable):
            await store.standing("lobby", "bob")
        with pytest.raises(BackendUnavailable):
            await store.create("team:x", "bob")
    finally:
        await client.aclose()


# -- the backends' factories --------------------------------------------------------------------


async def test_the_embedded_backend_keeps_rooms_in_the_accounts_file(tmp_path: Path) -> None:
    from chatd.backends.memory import create_memory_backend
    from tests.backends.conftest import backend_config

    path = tmp_path / "state" / "chatd.sqlite3"
    state = SqliteState.open(path)
    first = create_memory_backend(backend_config(), state)
    await first.rooms.create("team:acme", "alice")
    first.rooms.close()
    state.close()
    state = SqliteState.open(path)
    again = create_memory_backend(backend_config(), state)  # a restarted node
    try:
        assert (await again.rooms.standing("team:acme", "alice")).role == "owner"
    finally:
        again.rooms.close()
        state.close()


async def test_redis_backends_share_their_rooms(redis_server: RedisServer) -> None:
    from chatd.backends.redis import create_redis_backend
    from tests.backends.conftest import backend_config

    a = create_redis_backend(backend_config(redis_server.url, node_id="a"))
    b = create_redis_backend(backend_config(redis_server.url, node_id="b"))
    try:
        await a.rooms.create("team:acme", "alice")
        await a.rooms.restrict("team:acme", "eve", "ban", math.inf)
        assert await b.rooms.standing("team:acme", "eve") == RoomStanding(
            exists=True, banned_until=math.inf)
    finally:
        await a.broker.close()
        await b.broker.close()


# -- room changes reach every node --------------------------------------------------------------


class ChangeRecorder(Recorder):
    """A FeedHandler that also takes room changes."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self.changes: list[RoomChange] = []

    def room_change(self, change: RoomChange) -> None:
        self.changes.append(change)
        self._changed.set()


async def _started(kind: str, tmp_path: Path, server: RedisServer | None, n: int,
                   handler: Recorder) -> Backend:
    from chatd.backends.memory import create_memory_backend
    from chatd.backends.redis import create_redis_backend
    from tests.backends.conftest import backend_config

    if kind == "redis":
        assert server is not None
        backend = create_redis_backend(backend_config(server.url, node_id=f"n{n}"), linger=0.05)
    else:
        backend = create_memory_backend(backend_config(), SqliteState.open(
            tmp_path / f"s{n}" / "chatd.sqlite3"))
    await backend.broker.start(handler)
    if kind == "redis":
        await eventually(backend.broker.healthy)
    return backend


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_room_change_reaches_every_node_within_a_second(kind: str,
                                                                tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start() if kind == "redis" else None
    count = 2 if kind == "redis" else 1
    handlers = [ChangeRecorder(f"n{i}") for i in range(count)]
    backends = [await _started(kind, tmp_path, server, i, h) for i, h in enumerate(handlers)]
    try:
        change = RoomChange("team:acme", "bob", "banned")
        t0 = time.monotonic()
        await backends[0].broker.publish_room_change(change)
        for h in handlers:
            await h.wait_for(lambda r: change in r.changes, timeout=1.0)  # type: ignore[attr-defined]
        assert time.monotonic() - t0 < 1.0
        assert all(h.changes == [change] for h in handlers)
        assert all(h.of("control") == [] for h in handlers)  # not a close event
    finally:
        for b in backends:
            await b.broker.close()
            b.state.close()
            b.rooms.close()
        if server is not None:
            server.close()


async def test_a_handler_without_room_changes_is_left_alone(redis_server: RedisServer,
                                                             tmp_path: Path) -> None:
    plain, taker = Recorder(name="plain"), ChangeRecorder("taker")
    a = await _started("redis", tmp_path, redis_server, 0, plain)
    b = await _started("redis", tmp_path, redis_server, 1, taker)
    try:
        await a.broker.publish_room_change(RoomChange("lobby", "", "deleted"))
        await taker.wait_for(lambda r: r.changes)  # type: ignore[attr-defined]
        await a.broker.publish_control(CloseMatching(4410, "kicked", user="zed"))
        await plain.wait_for(lambda r: r.of("control"))
        assert a.broker.healthy() and plain.of("lost") == []
    finally:
        await a.broker.close()
        await b.broker.close()


async def test_garbage_on_the_room_change_channel_is_dropped_and_the_feed_lives_on(
        redis_server: RedisServer, tmp_path: Path) -> None:
    taker = ChangeRecorder("taker")
    node = await _started("redis", tmp_path, redis_server, 0, taker)
    raw = create_client(redis_server.url, 2.0)
    try:
        for junk in (b"not json", b"[1,2]", b'{"room":1,"user":"x"}', b'{"user":"x"}'):
            await raw.publish(b"chatd:ctl:rooms", junk)
        change = RoomChange("lobby", "bob", "removed")
        await node.broker.publish_room_change(change)
        await taker.wait_for(lambda r: r.changes)  # type: ignore[attr-defined]
        assert taker.changes == [change]
        assert node.broker.healthy() and taker.of("lost") == []
    finally:
        await raw.aclose()
        await node.broker.close()
