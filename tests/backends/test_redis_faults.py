"""The Redis backend when Redis misbehaves: killed, restarted, paused, gone at startup, wrong
password; and a node that dies without draining. Real ``redis-server`` processes throughout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from chatd import protocol
from chatd.backends.base import CloseMatching, room_stream
from chatd.backends.redis import create_redis_backend
from chatd.errors import BackendUnavailable
from tests.backends.conftest import (
    PRESENCE_TTL,
    PROBE_INTERVAL,
    BackendNode,
    Recorder,
    backend_config,
    eventually,
)
from tests.redis_server import RedisServer

NodeFactory = Callable[..., Awaitable[BackendNode]]

#: Short, so that noticing trouble is quick; the limits below are this plus scheduling slack.
COMMAND_TIMEOUT = 0.5


@pytest.fixture
async def make_node(redis_server: RedisServer) -> AsyncIterator[NodeFactory]:
    """Start backend "nodes" (on ``redis_server`` unless ``url`` is given); closed after."""
    nodes: list[BackendNode] = []

    async def make(url: str | None = None, **config: Any) -> BackendNode:
        config.setdefault("command_timeout", COMMAND_TIMEOUT)
        cfg = backend_config(url or redis_server.url, node_id=f"n{len(nodes)}", **config)
        node = BackendNode(create_redis_backend(cfg, linger=0.05), Recorder(f"n{len(nodes)}"))
        await node.broker.start(node.recorder)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.broker.close()


async def unavailable_within(seconds: float, aw: Awaitable[Any]) -> None:
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await aw
    assert time.monotonic() - t0 < seconds


async def test_a_killed_redis_makes_commands_unavailable_and_the_node_unready(
        make_node: NodeFactory, redis_server: RedisServer) -> None:
    a = await make_node()
    assert a.broker.healthy()
    await a.broker.subscribe_room("x")
    await a.presence.join("x", "alice")
    redis_server.kill()
    limit = COMMAND_TIMEOUT + 0.5
    await unavailable_within(limit, a.broker.publish_room("x", "alice", "lost?"))
    await unavailable_within(limit, a.broker.publish_direct("alice", "bob", "hi", "n0/1"))
    await unavailable_within(limit, a.broker.publish_control(CloseMatching(4410, "x", user="a")))
    await unavailable_within(limit, a.broker.publish_room_frame("x", b"{}"))
    await unavailable_within(limit, a.broker.recent(room_stream("x"), 5))
    await unavailable_within(limit, a.broker.history(room_stream("x"), before=None, since=None,
                                                     limit=5))
    await unavailable_within(limit, a.broker.replay(room_stream("x"), "1-0", 5))
    await unavailable_within(limit, a.broker.subscribe_room("new-room"))
    await unavailable_within(limit, a.presence.join("x", "bob"))
    await unavailable_within(limit, a.presence.members("x"))
    await unavailable_within(limit, a.backend.state.token_verdict("alice", "j", None, 0.0))
    await unavailable_within(limit, a.backend.state.get_user("alice"))
    await a.presence.leave("x", "alice")  # never raises
    a.broker.release_room("x")
    await eventually(lambda: not a.broker.healthy())


async def test_after_a_restart_the_feed_is_restored_and_the_lost_rooms_are_reported(
        make_node: NodeFactory, redis_server: RedisServer) -> None:
    a, b = await make_node(), await make_node()
    for room in ("x", "y"):
        await a.broker.subscribe_room(room)
    await a.broker.subscribe_user("bob")
    await a.broker.subscribe_room("released")
    a.broker.release_room("released")
    redis_server.kill()
    await eventually(lambda: not a.broker.healthy())
    redis_server.start()
    lost = await a.recorder.wait_for(lambda r: r.of("lost"))
    assert [e.rooms for e in lost] == [frozenset({"x", "y"})]
    await eventually(lambda: a.broker.healthy() and b.broker.healthy())
    # Every subscription is back: rooms, the user's channel, the control channel.
    m = await b.broker.publish_room("y", "carol", "after the restart")
    d = await b.broker.publish_direct("carol", "bob", "psst", "n1/1")
    event = CloseMatching(4410, "kicked", user="bob")
    await b.broker.publish_control(event)
    await a.recorder.wait_for(lambda r: any(e.msg_id == m.id for e in r.of("room", "y")))
    await a.recorder.wait_for(lambda r: any(e.msg_id == d.id for e in r.of("user", "bob")))
    await a.recorder.wait_for(lambda r: any(e.control == event for e in r.of("control")))
    assert len(a.recorder.of("lost")) == 1 and a.broker.feed.restarts == 1
    assert b.recorder.of("lost")  # b lost its feed too (with no rooms)


async def test_a_feed_connection_closed_by_redis_is_reconnected(
        make_node: NodeFactory, redis_server: RedisServer) -> None:
    a = await make_node()
    await a.broker.subscribe_room("x")
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await admin.client_kill_filter(_type="pubsub") == 1
    finally:
        await admin.aclose()
    lost = await a.recorder.wait_for(lambda r: r.of("lost"))
    assert lost[0].rooms == frozenset({"x"})
    await eventually(a.broker.healthy)
    m = await a.broker.publish_room("x", "alice", "back")
    await a.recorder.wait_for(lambda r: any(e.msg_id == m.id for e in r.of("room", "x")))


async def test_a_node_starts_while_redis_is_down_and_becomes_ready_when_it_appears(
        make_node: NodeFactory, tmp_path: Path) -> None:
    later = RedisServer(tmp_path / "later")
    t0 = time.monotonic()
    a = await make_node(later.url)  # nothing listens on that port yet
    assert time.monotonic() - t0 < COMMAND_TIMEOUT + 0.5
    assert not a.broker.healthy()
    await unavailable_within(COMMAND_TIMEOUT + 0.5, a.broker.subscribe_room("x"))
    await unavailable_within(COMMAND_TIMEOUT + 0.5, a.broker.publish_room("x", "a", "t"))
    with later:
        await eventually(a.broker.healthy)
        await a.broker.subscribe_room("x")
        m = await a.broker.publish_room("x", "alice", "hello")
        await a.recorder.wait_for(lambda r: any(e.msg_id == m.id for e in r.of("room", "x")))
        assert a.recorder.of("lost") == []  # nothing was subscribed, nothing was lost
        await a.broker.close()


async def test_a_paused_redis_answers_unavailable_within_the_command_timeout(
        make_node: NodeFactory, redis_server: RedisServer) -> None:
    a = await make_node()
    await a.broker.subscribe_room("x")
    before = await a.broker.publish_room("x", "alice", "before")
    redis_server.pause()
    try:
        limit = COMMAND_TIMEOUT + 0.3
        await unavailable_within(limit, a.broker.publish_room("x", "alice", "during"))
        await unavailable_within(limit, a.broker.replay(room_stream("x"), before.id, 10))
        await unavailable_within(limit, a.presence.members("x"))
        await unavailable_within(limit, a.backend.state.token_verdict("alice", "j", None, 0.0))
        await eventually(lambda: not a.broker.healthy(),
                         timeout=COMMAND_TIMEOUT + 2 * PROBE_INTERVAL + 1)
    finally:
        redis_server.resume()
    await eventually(a.broker.healthy)
    after = await a.broker.publish_room("x", "alice", "after")
    await a.recorder.wait_for(lambda r: any(e.msg_id == after.id for e in r.of("room", "x")))
    history = await a.broker.replay(room_stream("x"), before.id, 10)
    assert history[0][-1] == after and history[1] is True


async def test_a_dead_nodes_users_go_offline_within_the_presence_ttl(
        make_node: NodeFactory) -> None:
    a, b = await make_node(), await make_node()
    await a.broker.subscribe_room("lobby")
    await a.presence.join("lobby", "alice")
    await b.presence.join("lobby", "carol")
    await b.presence.join("lobby", "alice")  # alice is also on the node that dies
    assert await a.presence.members("lobby") == ["alice", "carol"]
    await b.broker.close()  # like SIGKILL: no drain, the heartbeat just stops
    t0 = time.monotonic()
    gone = protocol.presence("lobby", "carol", "offline")
    await a.recorder.wait_for(lambda r: any(e.frame == gone for e in r.of("room", "lobby")),
                              timeout=PRESENCE_TTL * 3)
    assert time.monotonic() - t0 <= PRESENCE_TTL + 0.5
    assert await a.presence.members("lobby") == ["alice"]
    alice_gone = protocol.presence("lobby", "alice", "offline")
    assert all(e.frame != alice_gone for e in a.recorder.of("room", "lobby"))


async def test_presence_comes_back_after_redis_lost_it(
        make_node: NodeFactory, redis_server: RedisServer) -> None:
    a = await make_node()
    await a.presence.join("lobby", "alice")
    redis_server.kill()
    redis_server.start()  # no persistence: the entries are gone
    await a.recorder.wait_for(lambda r: r.of("lost"))
    assert await eventually(lambda: a.presence.members("lobby"),
                            timeout=PRESENCE_TTL * 2) == ["alice"]


async def test_history_survives_a_restart_with_persistence(
        make_node: NodeFactory, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "aof", aof=True) as server:
        a = await make_node(server.url)
        sent = [await a.broker.publish_room("kept", "alice", f"m{i}") for i in range(5)]
        server.kill()
        server.start()
        await a.recorder.wait_for(lambda r: r.of("lost"))
        await eventually(a.broker.healthy)
        assert await a.broker.replay(room_stream("kept"), sent[1].id, 10) == (sent[2:], True)
        newer = await a.broker.publish_room("kept", "alice", "after")
        assert newer.id > sent[-1].id
        await a.broker.close()


async def test_a_password_in_the_url_is_used_and_a_wrong_one_is_unavailable(
        make_node: NodeFactory, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "pw", password="s3cret-pw") as server:
        a = await make_node(server.url)
        assert a.broker.healthy()
        await a.broker.subscribe_room("x")
        m = await a.broker.publish_room("x", "alice", "authenticated")
        await a.recorder.wait_for(lambda r: any(e.msg_id == m.id for e in r.of("room", "x")))
        wrong = await make_node(server.url.replace("s3cret-pw", "wrong"))
        assert not wrong.broker.healthy()
        await unavailable_within(COMMAND_TIMEOUT + 0.5, wrong.broker.publish_room("x", "a", "t"))
        await unavailable_within(COMMAND_TIMEOUT + 0.5, wrong.broker.subscribe_room("x"))
        await a.broker.close()
        await wrong.broker.close()


async def test_who_stays_cheap_in_a_room_of_ten_thousand(make_node: NodeFactory) -> None:
    # Entries must outlive the joins, and 500 joins at once queue for pooled connections.
    a = await make_node(presence_ttl=60, command_timeout=5.0)
    users = [f"user{i:05d}" for i in range(10_000)]
    for i in range(0, len(users), 500):
        await asyncio.gather(*(a.presence.join("big", u) for u in users[i:i + 500]))
    t0 = time.perf_counter()
    members = await a.presence.members("big")
    elapsed = time.perf_counter() - t0
    assert members == users
    assert elapsed < 0.25, f"who took {elapsed:.3f} s"


async def test_an_acl_user_in_the_url_is_used(make_node: NodeFactory,
                                              redis_server: RedisServer) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await admin.acl_setuser("chatd", enabled=True, passwords=["+acl-pw"], keys=["*"],
                                channels=["*"], commands=["+@all"])
    finally:
        await admin.aclose()
    a = await make_node(redis_server.url.replace("redis://", "redis://chatd:acl-pw@"))
    assert a.broker.healthy()
    await a.broker.subscribe_room("x")
    m = await a.broker.publish_room("x", "alice", "as an ACL user")
    await a.recorder.wait_for(lambda r: any(e.msg_id == m.id for e in r.of("room", "x")))


async def test_a_rediss_url_connects_over_tls(make_node: NodeFactory, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "tls", tls=True, password="tls-pw") as server:
        assert server.url.startswith("rediss://")
        a = await make_node(server.url)
        assert a.broker.healthy()
        await a.broker.subscribe_room("x")
        m = await a.broker.publish_room("x", "alice", "encrypted")
        await a.recorder.wait_for(lambda r: any(e.msg_id == m.id for e in r.of("room", "x")))
        assert await a.broker.replay(room_stream("x"), m.id, 5) == ([], True)
        await a.broker.close()


async def test_no_frame_is_delivered_between_a_lost_feed_and_feed_lost(
        make_node: NodeFactory, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that got a newer frame first would resume after it and skip the gap."""
    monkeypatch.setattr("chatd.backends.redis.feed.RESUBSCRIBE_BATCH", 1)  # a slow resubscribe
    a, b = await make_node(), await make_node()
    rooms = [f"r{i}" for i in range(30)]
    for room in rooms:
        await a.broker.subscribe_room(room)
    stop = asyncio.Event()

    async def chatter() -> None:
        i = 0
        while not stop.is_set():
            try:
                await b.broker.publish_room(rooms[i % len(rooms)], "bob", f"m{i}")
            except BackendUnavailable:
                await asyncio.sleep(0.005)
            i += 1

    task = asyncio.create_task(chatter())
    try:
        await a.recorder.wait_for(lambda r: len(r.of("room")) > 50)
        redis_server.kill()
        await eventually(lambda: not a.broker.healthy())
        mark = len(a.recorder.events)
        redis_server.start()
        await a.recorder.wait_for(lambda r: r.of("lost"))
        lost_at = next(i for i, e in enumerate(a.recorder.events) if e.kind == "lost")
        await a.recorder.wait_for(lambda r: len(r.events) > lost_at + 20)  # traffic resumed
    finally:
        stop.set()
        await task
    assert [e for e in a.recorder.events[mark:lost_at] if e.kind == "room"] == []
