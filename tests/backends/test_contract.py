"""The backend contract (chatd.backends.base), one suite run against every backend.

Broker and presence tests run on ``memory`` (the embedded single node) and ``redis`` (several
backend instances, i.e. nodes, on one real redis-server). State tests run on ``sqlite`` (the
embedded default's State) and ``redis``. The Redis runs start their own ``redis-server``; if it
is missing they fail, never skip.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from chatd import protocol
from chatd.backends.base import (
    CloseMatching,
    RefreshUpdate,
    RotateOutcome,
    SessionRecord,
    State,
    StoredMessage,
    TokenVerdict,
    UserRecord,
    dm_stream,
    room_stream,
)
from chatd.backends.redis import create_redis_backend
from chatd.backends.sqlite.state import SqliteState
from chatd.ids import id_key
from tests.backends.conftest import MAX_PER_ROOM, BackendNode, Cluster, backend_config, eventually
from tests.clock import Clock
from tests.redis_server import RedisServer

# -- helpers ------------------------------------------------------------------------------------


def messages(node: BackendNode, room: str) -> list[tuple[str | None, bytes]]:
    return [(e.msg_id, e.frame) for e in node.recorder.of("room", room) if e.msg_id is not None]


def presence_frames(node: BackendNode, room: str) -> list[bytes]:
    return [e.frame for e in node.recorder.of("room", room) if e.msg_id is None]


async def barrier(publisher: BackendNode, receivers: list[BackendNode], room: str) -> None:
    """Publish a marker to ``room`` and wait until every receiver has it.

    Frames published before the marker (from the same caller) have then arrived too: a node
    receives the frames of its subscriptions in publication order. This is how a test shows
    that something was *not* delivered without sleeping.
    """
    marker = await publisher.broker.publish_room(room, "marker", "barrier")
    for node in receivers:
        await node.recorder.wait_for(lambda r: any(e.msg_id == marker.id
                                                   for e in r.of("room", room)))


def ids_of(stored: list[StoredMessage]) -> list[str]:
    return [m.id for m in stored]


def assert_increasing(ids: list[str]) -> None:
    keys = [id_key(i) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), ids


# -- messages, ids and ordering -----------------------------------------------------------------


async def test_a_message_frame_carries_its_id_and_timestamp_and_the_exact_text(
        cluster: Cluster) -> None:
    a = await cluster.node()
    await a.broker.subscribe_room("general")
    text = 'quotes " backslash \\ newline \n emoji \U0001f600 </script>'
    msg = await a.broker.publish_room("general", "alice", text)
    obj = json.loads(msg.frame)
    assert obj == {"type": "message", "room": "general", "id": msg.id, "from": "alice",
                   "text": text, "ts": int(msg.id.split("-")[0])}
    assert abs(obj["ts"] / 1000 - time.time()) < 60
    await a.recorder.wait_for(lambda r: messages(a, "general") == [(msg.id, msg.frame)])


async def test_ids_are_strictly_increasing_within_a_room(cluster: Cluster) -> None:
    a = await cluster.node()
    stored = [await a.broker.publish_room("r1", "alice", f"m{i}") for i in range(MAX_PER_ROOM)]
    assert_increasing(ids_of(stored))
    assert ids_of(await a.broker.recent(room_stream("r1"), 100)) == ids_of(stored)


async def test_every_node_receives_every_message_once_in_the_same_order_with_the_same_ids(
        cluster: Cluster) -> None:
    a, b = await cluster.node(max_per_room=500), await cluster.node(max_per_room=500)
    await a.broker.subscribe_room("general")
    await b.broker.subscribe_room("general")
    sent = await asyncio.gather(
        *(node.broker.publish_room("general", node.recorder.name, f"m{i}")
          for i in range(60) for node in (a, b)))
    history = await b.broker.recent(room_stream("general"), 200)
    assert sorted(ids_of(list(sent)), key=id_key) == ids_of(history)
    expected = [(m.id, m.frame) for m in history]
    for node in (a, b):
        await node.recorder.wait_for(lambda r: len(r.of("room", "general")) >= 120)
        assert messages(node, "general") == expected  # once each, in stream order
    assert {(m.id, m.frame) for m in sent} == set(expected)  # what publish returned is stored


async def test_a_node_without_a_subscription_receives_nothing_of_the_room(
        cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    await a.broker.subscribe_room("watched")
    await b.broker.subscribe_room("watched")
    await a.broker.subscribe_room("mine")
    await a.broker.publish_room("mine", "alice", "only for a")
    await barrier(a, [a, b], "watched")
    assert len(messages(a, "mine")) == 1
    if cluster.multi_node:
        assert messages(b, "mine") == []


async def test_subscriptions_are_reference_counted(cluster: Cluster) -> None:
    a = await cluster.node()
    await a.broker.subscribe_room("sentinel")
    await a.broker.subscribe_room("counted")
    await a.broker.subscribe_room("counted")
    a.broker.release_room("counted")
    await a.broker.publish_room("counted", "alice", "still subscribed")
    await barrier(a, [a], "sentinel")
    assert len(messages(a, "counted")) == 1

    a.broker.release_room("counted")
    # Unsubscribing may be lazy: wait until a publish is no longer delivered.
    deadline = time.monotonic() + 5
    while True:
        before = len(messages(a, "counted"))
        await a.broker.publish_room("counted", "alice", "after release")
        await barrier(a, [a], "sentinel")
        if len(messages(a, "counted")) == before:
            break
        assert time.monotonic() < deadline, "still subscribed after every reference was dropped"
    a.broker.release_room("counted")  # one release too many: ignored, never raises
    a.broker.release_room("never-subscribed")

    await a.broker.subscribe_room("counted")  # and it can be taken again
    msg = await a.broker.publish_room("counted", "alice", "again")
    await a.recorder.wait_for(lambda r: messages(a, "counted")[-1][0] == msg.id)


async def test_a_frame_that_is_not_retained_reaches_members_without_an_id(
        cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    await b.broker.subscribe_room("general")
    frame = protocol.presence("general", "zed", "online")
    await a.broker.publish_room_frame("general", frame)
    await b.recorder.wait_for(lambda r: presence_frames(b, "general") == [frame])
    assert await a.broker.recent(room_stream("general"), 10) == []


async def test_control_events_reach_every_node_including_the_sender(cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    event = CloseMatching(4410, "kicked", user="bob", issued_before=1767225600.5,
                          except_conn="n0/1")
    await a.broker.publish_control(event)
    for node in (a, b):
        await node.recorder.wait_for(lambda r: [e.control for e in r.of("control")] == [event])


# -- direct messages ----------------------------------------------------------------------------


async def test_a_direct_message_reaches_both_users_with_its_origin_in_both_directions(
        cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    await a.broker.subscribe_user("bob")  # bob is connected to a, alice to b
    await b.broker.subscribe_user("alice")
    m1 = await b.broker.publish_direct("alice", "bob", "psst", "n1/7")
    m2 = await a.broker.publish_direct("bob", "alice", "what?", "n0 with spaces/3")
    assert id_key(m1.id) < id_key(m2.id)
    assert json.loads(m1.frame) == {"type": "message", "to": "bob", "id": m1.id, "from": "alice",
                                    "text": "psst", "ts": int(m1.id.split("-")[0])}
    want = {("bob", m1.id, m1.frame, "n1/7"), ("alice", m1.id, m1.frame, "n1/7"),
            ("bob", m2.id, m2.frame, "n0 with spaces/3"),
            ("alice", m2.id, m2.frame, "n0 with spaces/3")}

    def got(*nodes: BackendNode) -> set[tuple[str, str | None, bytes, str]]:
        return {(e.target, e.msg_id, e.frame, e.origin)
                for n in nodes for e in n.recorder.of("user")}

    await a.recorder.wait_for(lambda r: len(got(a)) >= 2)
    await b.recorder.wait_for(lambda r: len(got(b)) >= 2)
    assert got(a, b) == want
    if cluster.multi_node:
        assert {e.target for e in a.recorder.of("user")} == {"bob"}
        assert {e.target for e in b.recorder.of("user")} == {"alice"}
    conversation = await a.broker.history(dm_stream("bob", "alice"), before=None, since=None,
                                          limit=10)
    assert conversation == [m1, m2]
    assert dm_stream("alice", "bob") == dm_stream("bob", "alice")


async def test_a_direct_message_to_oneself_is_delivered_once(cluster: Cluster) -> None:
    a = await cluster.node()
    await a.broker.subscribe_user("alice")
    msg = await a.broker.publish_direct("alice", "alice", "note to self", "n0/1")
    await a.recorder.wait_for(lambda r: r.of("user"))
    await a.broker.subscribe_room("sentinel")
    await barrier(a, [a], "sentinel")
    assert [(e.target, e.msg_id) for e in a.recorder.of("user")] == [("alice", msg.id)]


async def test_a_direct_message_to_an_offline_user_is_kept_in_the_conversation(
        cluster: Cluster) -> None:
    a = await cluster.node()
    msg = await a.broker.publish_direct("alice", "carol", "read this later", "n0/1")
    assert await a.broker.recent(dm_stream("carol", "alice"), 5) == [msg]


# -- history and replay -------------------------------------------------------------------------


@pytest.fixture
async def ten(cluster: Cluster) -> tuple[BackendNode, list[StoredMessage]]:
    a = await cluster.node()
    return a, [await a.broker.publish_room("h", "alice", f"m{i}") for i in range(10)]


async def test_recent_returns_the_newest_messages_oldest_first(
        ten: tuple[BackendNode, list[StoredMessage]]) -> None:
    a, sent = ten
    assert await a.broker.recent(room_stream("h"), 3) == sent[-3:]
    assert await a.broker.recent(room_stream("h"), 100) == sent
    assert await a.broker.recent(room_stream("h"), 0) == []
    assert await a.broker.recent(room_stream("nothing-here"), 5) == []


async def test_history_pages_with_before_and_since(
        ten: tuple[BackendNode, list[StoredMessage]]) -> None:
    a, sent = ten
    s = room_stream("h")
    h = a.broker.history
    assert await h(s, before=None, since=None, limit=4) == sent[-4:]
    assert await h(s, before=sent[5].id, since=None, limit=3) == sent[2:5]
    assert await h(s, before=sent[2].id, since=None, limit=50) == sent[:2]
    assert await h(s, before=None, since=sent[2].id, limit=3) == sent[3:6]
    assert await h(s, before=None, since=sent[8].id, limit=50) == sent[9:]
    assert await h(s, before=sent[7].id, since=sent[1].id, limit=50) == sent[2:7]
    assert await h(s, before=sent[7].id, since=sent[1].id, limit=2) == sent[5:7]
    assert await h(s, before=sent[3].id, since=sent[3].id, limit=5) == []
    assert await h(s, before=sent[0].id, since=None, limit=5) == []
    assert await h(s, before="0-0", since=None, limit=5) == []
    assert await h(s, before=None, since=sent[9].id, limit=5) == []
    assert await h(s, before=None, since="0-0", limit=2) == sent[:2]
    assert await h(room_stream("none"), before=None, since=None, limit=5) == []


async def test_replay_from_a_retained_id_is_recovered(
        ten: tuple[BackendNode, list[StoredMessage]]) -> None:
    a, sent = ten
    s = room_stream("h")
    assert await a.broker.replay(s, sent[3].id, 100) == (sent[4:], True)
    assert await a.broker.replay(s, sent[0].id, 9) == (sent[1:], True)
    assert await a.broker.replay(s, sent[-1].id, 100) == ([], True)


async def test_replay_with_more_than_limit_missed_is_not_recovered(
        ten: tuple[BackendNode, list[StoredMessage]]) -> None:
    a, sent = ten
    assert await a.broker.replay(room_stream("h"), sent[3].id, 2) == (sent[4:6], False)


async def test_replay_from_an_id_the_stream_never_had_is_not_recovered(
        ten: tuple[BackendNode, list[StoredMessage]]) -> None:
    a, sent = ten
    s = room_stream("h")
    before_first = f"{int(sent[0].id.split('-')[0]) - 1}-0"
    assert await a.broker.replay(s, before_first, 100) == (sent, False)
    assert await a.broker.replay(s, "99999999999999-0", 100) == ([], False)
    assert await a.broker.replay(room_stream("empty"), sent[0].id, 100) == ([], False)


async def test_replay_from_a_trimmed_id_is_not_recovered_and_history_is_bounded(
        cluster: Cluster) -> None:
    a = await cluster.node()
    first = await a.broker.publish_room("busy", "alice", "first")
    for i in range(MAX_PER_ROOM * 15):
        await a.broker.publish_room("busy", "alice", f"m{i}")
    kept = await a.broker.recent(room_stream("busy"), 10_000)
    # Redis trims whole stream nodes (MAXLEN ~): a little more than the maximum may be kept.
    assert MAX_PER_ROOM <= len(kept) <= MAX_PER_ROOM + 200
    assert first not in kept
    missed, recovered = await a.broker.replay(room_stream("busy"), first.id, 10_000)
    assert recovered is False
    assert missed == kept
    # From the oldest id still retained, nothing is missing.
    assert await a.broker.replay(room_stream("busy"), kept[0].id, 10_000) == (kept[1:], True)


async def test_replay_after_the_history_was_lost_is_not_recovered(cluster: Cluster) -> None:
    a = await cluster.node()
    old = [await a.broker.publish_room("gone", "alice", f"m{i}") for i in range(3)]
    if cluster.redis is not None:
        cluster.redis.kill()  # no persistence: every stream is gone
        cluster.redis.start()
        await a.recorder.wait_for(lambda r: r.of("lost"))  # the node noticed
        await eventually(a.broker.healthy)
    else:
        a = await cluster.new_node()  # the embedded backend restarted
    assert await a.broker.replay(room_stream("gone"), old[1].id, 100) == ([], False)
    new = await a.broker.publish_room("gone", "alice", "after the loss")
    assert id_key(new.id) > id_key(old[-1].id)
    assert await a.broker.replay(room_stream("gone"), old[1].id, 100) == ([new], False)


# -- presence -----------------------------------------------------------------------------------


def online(room: str, user: str) -> bytes:
    return protocol.presence(room, user, "online")


def offline(room: str, user: str) -> bytes:
    return protocol.presence(room, user, "offline")


async def test_the_first_join_announces_online_and_the_last_leave_offline(
        cluster: Cluster) -> None:
    a = await cluster.node()
    await a.broker.subscribe_room("lobby")
    await a.presence.join("lobby", "alice")
    await a.recorder.wait_for(lambda r: presence_frames(a, "lobby") == [online("lobby", "alice")])
    await a.presence.join("lobby", "alice")  # a second connection of alice
    assert await a.presence.members("lobby") == ["alice"]
    await a.presence.leave("lobby", "alice")
    assert await a.presence.members("lobby") == ["alice"]
    await barrier(a, [a], "lobby")
    assert presence_frames(a, "lobby") == [online("lobby", "alice")]
    await a.presence.leave("lobby", "alice")
    await a.recorder.wait_for(lambda r: presence_frames(a, "lobby")[-1:]
                              == [offline("lobby", "alice")])
    assert await a.presence.members("lobby") == []
    await a.presence.leave("lobby", "alice")  # never joined any more: ignored
    await a.presence.leave("elsewhere", "nobody")


async def test_members_are_sorted_and_per_room(cluster: Cluster) -> None:
    a = await cluster.node()
    for user in ("carol", "alice", "bob"):
        await a.presence.join("one", user)
    await a.presence.join("two", "dave")
    assert await a.presence.members("one") == ["alice", "bob", "carol"]
    assert await a.presence.members("two") == ["dave"]
    assert await a.presence.members("three") == []


async def test_a_user_on_several_nodes_is_present_until_gone_from_all(cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    for node in (a, b):
        await node.broker.subscribe_room("lobby")
    await a.presence.join("lobby", "alice")
    await b.presence.join("lobby", "alice")
    await b.presence.join("lobby", "bob")
    for node in (a, b):
        assert await node.presence.members("lobby") == ["alice", "bob"]
    await a.presence.leave("lobby", "alice")
    for node in (a, b):
        assert await node.presence.members("lobby") == ["alice", "bob"]
    await barrier(a, [a, b], "lobby")
    for node in (a, b):
        assert presence_frames(node, "lobby") == [online("lobby", "alice"), online("lobby", "bob")]
    await b.presence.leave("lobby", "alice")
    for node in (a, b):
        await node.recorder.wait_for(
            lambda r: any(e.frame == offline("lobby", "alice") for e in r.of("room", "lobby")))
        assert await node.presence.members("lobby") == ["bob"]


async def test_drain_removes_this_nodes_entries_at_once(cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    await b.broker.subscribe_room("lobby")
    await a.presence.join("lobby", "alice")
    await a.presence.join("lobby", "shared")
    if cluster.multi_node:
        await b.presence.join("lobby", "bob")
        await b.presence.join("lobby", "shared")
    await a.presence.drain()
    expected = ["bob", "shared"] if cluster.multi_node else []
    assert await b.presence.members("lobby") == expected
    if cluster.multi_node:  # other nodes are told at once (a single node has no one to tell)
        await b.recorder.wait_for(
            lambda r: offline("lobby", "alice") in presence_frames(b, "lobby"))
        await barrier(b, [b], "lobby")
        assert offline("lobby", "shared") not in presence_frames(b, "lobby")


# -- state --------------------------------------------------------------------------------------

T0 = 1_800_000_000.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "redis"])
async def state(request: pytest.FixtureRequest, tmp_path: Path,
                clock: Clock) -> AsyncIterator[State]:
    if request.param == "sqlite":
        s = SqliteState.open(tmp_path / "state" / "chatd.sqlite3", clock=clock)
        yield s
        s.close()
        return
    with RedisServer(tmp_path / "redis") as server:
        backend = create_redis_backend(backend_config(server.url), clock=clock)
        try:
            yield backend.state
        finally:
            await backend.broker.close()


@pytest.fixture
def redis_pair(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis2") as server:
        yield server


def sess(sid: str, clock: Clock, *, user: str = "alice", created: float | None = None,
         ttl: float = 3600) -> SessionRecord:
    created = clock() if created is None else created
    return SessionRecord(sid=sid, user=user, device="laptop", created_at=created,
                         expires_at=created + ttl, refresh_hash=f"h-{sid}-0")


def update(clock: Clock, new_hash: str, n: int = 1) -> RefreshUpdate:
    return RefreshUpdate(new_hash=new_hash, rotated_at=clock(), refreshes_today=n, day=7)


async def test_users_are_stored_listed_updated_and_deleted(state: State) -> None:
    assert await state.get_user("alice") is None
    alice = UserRecord("alice", "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", False, T0)
    jwt_only = UserRecord("zed", None, True, T0 + 1.5)
    await state.put_user(alice)
    await state.put_user(jwt_only)
    assert await state.get_user("alice") == alice
    assert await state.get_user("zed") == jwt_only
    assert await state.list_users() == [alice, jwt_only]
    changed = UserRecord("alice", None, True, T0)
    await state.put_user(changed)
    assert await state.get_user("alice") == changed
    assert await state.delete_user("alice") is True
    assert await state.delete_user("alice") is False
    assert await state.list_users() == [jwt_only]


async def test_accounts_and_users_seen_are_known(state: State) -> None:
    assert await state.user_known("bob") is False
    await state.note_seen("bob")
    await state.note_seen("bob")
    assert await state.user_known("bob") is True
    await state.put_user(UserRecord("carol", "x"))
    assert await state.user_known("carol") is True
    assert await state.get_user("bob") is None  # seen is not an account


async def test_disabling_needs_an_account_and_is_the_token_verdict(state: State) -> None:
    assert await state.set_disabled("ghost", True) is False
    await state.put_user(UserRecord("bob", "x"))
    assert await state.token_verdict("bob", "j1", None, 1.0) is TokenVerdict.OK
    assert await state.set_disabled("bob", True) is True
    assert await state.token_verdict("bob", "j1", "s1", 1.0) is TokenVerdict.DISABLED
    assert (await state.get_user("bob")) == UserRecord("bob", "x", True, 0.0)
    assert await state.set_disabled("bob", False) is True
    assert await state.token_verdict("bob", "j1", None, 1.0) is TokenVerdict.OK
    await state.put_user(UserRecord("bob", "x", disabled=True))
    assert await state.token_verdict("bob", "j1", None, 1.0) is TokenVerdict.DISABLED
    await state.delete_user("bob")
    assert await state.token_verdict("bob", "j1", None, 1.0) is TokenVerdict.OK


async def test_sessions_are_listed_oldest_first_and_hidden_once_expired(
        state: State, clock: Clock) -> None:
    s1 = sess("s1", clock, created=clock() - 10, ttl=100)
    s2 = sess("s2", clock, ttl=3600)
    s3 = sess("s3", clock, created=clock() - 5, ttl=3600)
    other = sess("s4", clock, user="bob")
    for s in (s2, s1, s3, other):
        await state.create_session(s)
    assert await state.get_session("s1") == s1
    assert await state.user_sessions("alice") == [s1, s3, s2]
    clock.advance(200)
    assert await state.get_session("s1") is None
    assert await state.user_sessions("alice") == [s3, s2]
    await state.delete_session("s3")
    await state.delete_session("s3")
    assert await state.get_session("s3") is None
    assert await state.user_sessions("alice") == [s2]
    assert await state.user_sessions("bob") == [other]
    assert await state.get_session("nope") is None


async def test_rotation_replaces_the_hash_and_presenting_an_old_one_is_reuse(
        state: State, clock: Clock) -> None:
    await state.create_session(sess("s1", clock))
    assert await state.rotate_refresh("s1", "h-s1-0", update(clock, "h1"), 0) \
        is RotateOutcome.ROTATED
    s = await state.get_session("s1")
    assert s is not None
    assert (s.refresh_hash, s.live, s.spent, s.rotated_at, s.refreshes_today, s.day) == \
        ("h1", (), (("h-s1-0", clock()),), clock(), 1, 7)
    clock.advance(1)
    assert await state.rotate_refresh("s1", "h1", update(clock, "h2", 2), 0) \
        is RotateOutcome.ROTATED
    assert await state.rotate_refresh("s1", "h1", update(clock, "h3"), 0) is RotateOutcome.REUSED
    assert await state.rotate_refresh("s1", "h-s1-0", update(clock, "h3"), 0) \
        is RotateOutcome.REUSED
    assert await state.rotate_refresh("nope", "h2", update(clock, "h3"), 0) \
        is RotateOutcome.UNKNOWN
    clock.advance(3601)
    assert await state.rotate_refresh("s1", "h2", update(clock, "h3"), 0) \
        is RotateOutcome.UNKNOWN


async def test_the_grace_window_rotates_the_previous_token_again_without_stretching(
        state: State, clock: Clock) -> None:
    await state.create_session(sess("s1", clock))
    await state.rotate_refresh("s1", "h-s1-0", update(clock, "h1"), 10)
    first_rotation = clock()
    clock.advance(6)  # the response was lost; the client presents the old token again
    assert await state.rotate_refresh("s1", "h-s1-0", update(clock, "h1b"), 10) \
        is RotateOutcome.ROTATED
    s = await state.get_session("s1")
    assert s is not None and s.refresh_hash == "h1b" and s.rotated_at == first_rotation
    clock.advance(6)  # 12 s after the rotation: outside the window
    assert await state.rotate_refresh("s1", "h-s1-0", update(clock, "h1c"), 10) \
        is RotateOutcome.REUSED


async def test_concurrent_rotations_of_one_token_rotate_once(state: State, clock: Clock) -> None:
    await state.create_session(sess("s1", clock))
    outcomes = await asyncio.gather(*(state.rotate_refresh("s1", "h-s1-0",
                                                           update(clock, f"n{i}"), 0)
                                      for i in range(8)))
    assert sorted(o.value for o in outcomes) == ["reused"] * 7 + ["rotated"]


async def test_token_verdicts_follow_the_deny_entries(state: State, clock: Clock) -> None:
    now = clock()
    ok = TokenVerdict.OK
    await state.revoke_jti("j-bad", now + 60)
    await state.revoke_session("s-bad", now + 60)
    await state.revoke_user_before("bob", now - 100, now + 60)
    assert await state.token_verdict("alice", "j-bad", None, now) is TokenVerdict.REVOKED
    assert await state.token_verdict("alice", "j-good", None, now) is ok
    assert await state.token_verdict("alice", "j-good", "s-bad", now) is TokenVerdict.REVOKED
    assert await state.token_verdict("alice", "j-good", "s-good", now) is ok
    assert await state.token_verdict("bob", "j-good", None, now - 101) is TokenVerdict.REVOKED
    assert await state.token_verdict("bob", "j-good", None, now - 100) is ok
    assert await state.token_verdict("alice", "j-good", None, now - 101) is ok
    # Revoking again keeps the widest mark.
    await state.revoke_user_before("bob", now - 500, now + 10)
    assert await state.token_verdict("bob", "j-good", None, now - 101) is TokenVerdict.REVOKED
    await state.revoke_user_before("bob", now + 1, now + 10)
    assert await state.token_verdict("bob", "j-good", None, now) is TokenVerdict.REVOKED
    # An entry whose time has passed is no entry.
    await state.revoke_jti("j-old", now - 1)
    assert await state.token_verdict("alice", "j-old", None, now) is ok


async def test_deny_entries_expire_with_what_they_deny(state: State, clock: Clock) -> None:
    now = clock()
    await state.revoke_jti("j", now + 0.3)
    await state.revoke_session("s", now + 0.3)
    await state.revoke_user_before("carol", now, now + 0.3)
    assert await state.token_verdict("carol", "j", "s", now - 1) is TokenVerdict.REVOKED
    clock.advance(0.5)  # SQLite decides by the clock, Redis by the key's TTL: wait for both

    async def cleared() -> bool:
        verdicts = [await state.token_verdict("x", "j", None, now),
                    await state.token_verdict("x", "j2", "s", now),
                    await state.token_verdict("carol", "j2", None, now - 1)]
        return verdicts == [TokenVerdict.OK] * 3

    await eventually(cleared)


# --- hostile users (issue 19) and the session defects of issue 11 --------------------------------


async def test_two_simultaneous_logins_with_a_limit_of_one_leave_exactly_one_session(
        state: State, clock: Clock) -> None:
    for trial in range(10):
        a, b = sess(f"a{trial}", clock, user=f"u{trial}"), sess(f"b{trial}", clock,
                                                                 user=f"u{trial}")
        ended_a, ended_b = await asyncio.gather(state.create_session(a, 1),
                                                state.create_session(b, 1))
        left = [s.sid for s in await state.user_sessions(f"u{trial}")]
        assert len(left) == 1
        # The one that did not survive is reported ended by exactly the other creation.
        assert sorted(ended_a + ended_b + left) == sorted([a.sid, b.sid])


async def test_a_refresh_hash_the_session_never_issued_is_unknown_and_changes_nothing(
        state: State, clock: Clock) -> None:
    await state.create_session(sess("s1", clock))
    before = await state.get_session("s1")
    assert await state.rotate_refresh("s1", "forged", update(clock, "n"), 30) \
        is RotateOutcome.UNKNOWN
    assert await state.get_session("s1") == before
    assert await state.rotate_refresh("s1", "h-s1-0", update(clock, "h1"), 30) \
        is RotateOutcome.ROTATED


async def test_two_tabs_sharing_one_token_inside_the_grace_window_both_keep_working(
        state: State, clock: Clock) -> None:
    await state.create_session(sess("s1", clock))
    assert await state.rotate_refresh("s1", "h-s1-0", update(clock, "tab-a"), 10) \
        is RotateOutcome.ROTATED
    clock.advance(2)
    assert await state.rotate_refresh("s1", "h-s1-0", update(clock, "tab-b"), 10) \
        is RotateOutcome.ROTATED
    clock.advance(60)  # long after the window, each tab refreshes with its own token
    assert await state.rotate_refresh("s1", "tab-a", update(clock, "tab-a2"), 10) \
        is RotateOutcome.ROTATED
    assert await state.rotate_refresh("s1", "tab-b", update(clock, "tab-b2"), 10) \
        is RotateOutcome.ROTATED
    clock.advance(11)  # a spent token outside its window is still reuse
    assert await state.rotate_refresh("s1", "tab-a", update(clock, "x"), 10) \
        is RotateOutcome.REUSED


async def test_a_user_mark_covers_the_leeway_but_not_sessions_opened_after_it(
        state: State, clock: Clock) -> None:
    now = clock()
    await state.revoke_user_before("bob", now, now + 600, skew=30)
    # iat up to the leeway in the future (an issuer whose clock runs ahead) is "before".
    assert await state.token_verdict("bob", "j", None, now + 29) is TokenVerdict.REVOKED
    assert await state.token_verdict("bob", "j", None, now + 31) is TokenVerdict.OK
    # A session opened after the mark mints tokens that work, whatever their iat's rounding.
    await state.create_session(sess("s-new", clock, user="bob", created=now + 0.2))
    await state.create_session(sess("s-old", clock, user="bob", created=now - 5))
    assert await state.token_verdict("bob", "j", "s-new", now - 0.8) is TokenVerdict.OK
    assert await state.token_verdict("bob", "j", "s-old", now) is TokenVerdict.REVOKED
    assert await state.token_verdict("carl", "j", "s-new", now) is TokenVerdict.OK


async def test_a_jti_revoked_for_one_issuer_and_subject_leaves_the_same_jti_of_others(
        state: State, clock: Clock) -> None:
    now = clock()
    await state.revoke_jti("J", now + 60, issuer="", user="mallory")
    assert await state.token_verdict("mallory", "J", None, now) is TokenVerdict.REVOKED
    assert await state.token_verdict("alice", "J", None, now) is TokenVerdict.OK
    assert await state.token_verdict("mallory", "J", None, now, "other-idp") is TokenVerdict.OK
    await state.revoke_jti("J", now + 60)  # an admin's revoke_jti names only the jti
    assert await state.token_verdict("alice", "J", None, now, "other-idp") is TokenVerdict.REVOKED
