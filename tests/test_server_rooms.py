"""Rooms, direct messages, history, resume and presence over real sockets (embedded backend)."""

from __future__ import annotations

import asyncio

from chatd.server import Node
from tests.conftest import ClientFactory, NodeFactory


async def test_join_send_and_every_member_gets_the_message_once(connect: ClientFactory) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    joined = await alice.request("join", "joined", room="general")
    assert (joined["room"], joined["members"], joined["history"]) == ("general", ["alice"], [])
    assert "recovered" not in joined
    assert (await bob.request("join", "joined", room="general"))["members"] == ["alice", "bob"]
    ack = await alice.request("send", "ack", room="general", text="hi")
    msg_a = await alice.expect("message")
    msg_b = await bob.expect("message")
    assert msg_a == msg_b
    assert msg_a["id"] == ack["id"]
    assert (msg_a["room"], msg_a["from"], msg_a["text"]) == ("general", "alice", "hi")
    assert msg_a["ts"] == int(ack["id"].split("-")[0])


async def test_messages_arrive_in_the_same_order_on_every_connection(
        connect: ClientFactory) -> None:
    members = [await connect(u) for u in ("alice", "bob", "carol")]
    for m in members:
        await m.request("join", "joined", room="r")
    for i in range(30):
        await members[i % 3].send(type="send", room="r", text=str(i))
    seen = []
    for m in members:
        ids = [(await m.expect("message"))["id"] for _ in range(30)]
        seen.append(ids)
    assert seen[0] == seen[1] == seen[2]
    assert len(set(seen[0])) == 30
    keys = [tuple(map(int, i.split("-"))) for i in seen[0]]
    assert keys == sorted(keys)


async def test_send_to_a_room_not_joined_is_not_joined(connect: ClientFactory) -> None:
    c = await connect("alice")
    answer = await c.request("send", "ack", room="general", text="hi")
    assert (answer["type"], answer["code"]) == ("error", "not_joined")
    for kind, fields in (("who", {}), ("history", {})):
        answer = await c.request(kind, kind, room="general", **fields)
        assert answer["code"] == "not_joined"


async def test_leave_stops_delivery(connect: ClientFactory) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    await alice.request("join", "joined", room="g")
    await bob.request("join", "joined", room="g")
    left = await bob.request("leave", "left", room="g")
    assert (left["type"], left["room"]) == ("left", "g")
    await alice.request("send", "ack", room="g", text="after")
    await bob.request("ping", "pong")
    assert not bob.seen("message")


async def test_who_lists_members_and_presence_announces_arrivals_and_departures(
        connect: ClientFactory) -> None:
    alice = await connect("alice")
    await alice.request("join", "joined", room="g")
    bob = await connect("bob")
    await bob.request("join", "joined", room="g")
    assert await alice.expect("presence", user="bob") == {
        "type": "presence", "room": "g", "user": "bob", "status": "online"}
    assert (await alice.request("who", "who", room="g"))["members"] == ["alice", "bob"]
    await bob.close()
    offline = await alice.expect("presence", user="bob", status="offline")
    assert offline["room"] == "g"
    assert (await alice.request("who", "who", room="g"))["members"] == ["alice"]


async def test_presence_counts_connections_not_sockets(connect: ClientFactory) -> None:
    alice = await connect("alice")
    await alice.request("join", "joined", room="g")
    bob1, bob2 = await connect("bob"), await connect("bob")
    await bob1.request("join", "joined", room="g")
    await bob2.request("join", "joined", room="g")
    await bob1.close()
    assert (await alice.request("who", "who", room="g"))["members"] == ["alice", "bob"]
    assert not alice.seen("presence", status="offline")


async def test_join_returns_recent_history_and_history_pages(connect: ClientFactory) -> None:
    alice = await connect("alice")
    await alice.request("join", "joined", room="g")
    ids = [(await alice.request("send", "ack", room="g", text=f"m{i}"))["id"] for i in range(25)]
    bob = await connect("bob")
    joined = await bob.request("join", "joined", room="g")
    assert [m["id"] for m in joined["history"]] == ids[-20:]
    page = await bob.request("history", "history", room="g", before=ids[10], limit=5)
    assert [m["text"] for m in page["messages"]] == ["m5", "m6", "m7", "m8", "m9"]
    after = await bob.request("history", "history", room="g", since=ids[20])
    assert [m["id"] for m in after["messages"]] == ids[21:]


async def test_join_with_since_resumes_and_says_recovered(connect: ClientFactory) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    await alice.request("join", "joined", room="g")
    await bob.request("join", "joined", room="g")
    first = await alice.request("send", "ack", room="g", text="one")
    await bob.close()
    later = [(await alice.request("send", "ack", room="g", text=t))["id"] for t in ("two", "3")]
    bob = await connect("bob")
    joined = await bob.request("join", "joined", room="g", since=first["id"])
    assert joined["recovered"] is True
    assert [m["id"] for m in joined["history"]] == later


async def test_join_with_unknown_since_is_not_recovered(connect: ClientFactory) -> None:
    alice = await connect("alice")
    await alice.request("join", "joined", room="g")
    await alice.request("send", "ack", room="g", text="one")
    bob = await connect("bob")
    joined = await bob.request("join", "joined", room="g", since="1-0")
    assert joined["recovered"] is False


async def test_trimmed_history_is_not_recovered(node_factory: NodeFactory,
                                                connect: ClientFactory) -> None:
    node = await node_factory(history={"max_per_room": 5, "max_replay": 5})
    alice = await connect("alice", target=node)
    await alice.request("join", "joined", room="g")
    first = await alice.request("send", "ack", room="g", text="0")
    for i in range(6):
        await alice.request("send", "ack", room="g", text=str(i + 1))
    bob = await connect("bob", target=node)
    joined = await bob.request("join", "joined", room="g", since=first["id"])
    assert joined["recovered"] is False
    assert len(joined["history"]) == 5


async def test_direct_message_reaches_recipient_and_senders_other_connections(
        connect: ClientFactory) -> None:
    bob = await connect("bob")
    alice1, alice2 = await connect("alice"), await connect("alice")
    ack = await alice1.request("send", "ack", to="bob", text="psst")
    got = await bob.expect("message")
    assert got == {"type": "message", "to": "bob", "id": ack["id"], "from": "alice",
                   "text": "psst", "ts": got["ts"]}
    assert await alice2.expect("message") == got
    await alice1.request("ping", "pong")
    assert not alice1.seen("message")


async def test_direct_messages_are_kept_for_offline_users(connect: ClientFactory) -> None:
    bob = await connect("bob")
    await bob.close()
    alice = await connect("alice")
    await alice.request("send", "ack", to="bob", text="while you were away")
    bob = await connect("bob")
    page = await bob.request("history", "history", **{"with": "alice"})
    assert [m["text"] for m in page["messages"]] == ["while you were away"]


async def test_direct_message_to_unknown_user_is_not_found(connect: ClientFactory) -> None:
    alice = await connect("alice")
    answer = await alice.request("send", "ack", to="nobody", text="hello?")
    assert (answer["type"], answer["code"]) == ("error", "not_found")


async def test_too_many_rooms(node_factory: NodeFactory, connect: ClientFactory) -> None:
    node = await node_factory(limits={"max_rooms_per_connection": 2})
    c = await connect("alice", target=node)
    await c.request("join", "joined", room="a")
    await c.request("join", "joined", room="b")
    answer = await c.request("join", "joined", room="c")
    assert (answer["type"], answer["code"]) == ("error", "too_many_rooms")
    assert (await c.request("join", "joined", room="a"))["type"] == "joined"


async def test_application_ping_answers_pong_with_ref(connect: ClientFactory) -> None:
    c = await connect("alice")
    await c.send(type="ping", ref="p1")
    assert await c.recv() == {"type": "pong", "ref": "p1"}


async def test_errors_echo_the_ref_and_keep_the_connection(connect: ClientFactory) -> None:
    c = await connect("alice")
    await c.send(type="send", room="bad room!", text="x", ref="e1")
    error = await c.recv()
    assert (error["type"], error["code"], error["ref"]) == ("error", "bad_request", "e1")
    await c.send(type="bogus", ref="e2")
    assert (await c.recv())["ref"] == "e2"
    assert (await c.request("ping", "pong"))["type"] == "pong"


async def test_a_failed_join_leaves_no_membership(node: Node, connect: ClientFactory) -> None:
    c = await connect("alice")
    await c.request("join", "joined", room="g")
    await c.request("leave", "left", room="g")
    await asyncio.sleep(0)
    assert node.hub.members("g") == 0
    assert (await c.request("who", "who", room="g"))["code"] == "not_joined"
