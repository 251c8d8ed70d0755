"""Section 9 over real sockets: join enforces the access mode, room commands, live removals."""

from __future__ import annotations

from typing import Any

import pytest

from chatd import config as config_module
from chatd.auth.keys import KeyRing
from chatd.auth.room_tokens import issue_room_token
from chatd.auth.tokens import TokenIssuer
from chatd.server import Node
from tests.conftest import ClientFactory, NodeFactory
from tests.nodes import SECRET, issue

NAMESPACES = {"namespaces": [
    {"name": "team", "access": "members", "allow_create": True},
    {"name": "paid", "access": "token"},
    {"name": "tiny", "access": "open", "max_members": 1},
]}


def room_token(user: str, room: str, ttl: float = 600, **kwargs: Any) -> str:
    config = config_module.load(None, env={"CHATD_JWT_SECRET": SECRET})
    keyring, _ = KeyRing.from_config(config, env={})
    return issue_room_token(TokenIssuer(keyring), user, room, ttl, **kwargs)


@pytest.fixture
async def node(node_factory: NodeFactory) -> Node:
    return await node_factory(rooms=NAMESPACES)


async def test_a_members_room_is_closed_to_outsiders_until_the_owner_adds_them(
        connect: ClientFactory) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    assert (await alice.request("create", "ack", room="team:acme"))["type"] == "ack"
    refused = await bob.request("join", "joined", room="team:acme")
    assert (refused["type"], refused["code"]) == ("error", "forbidden")
    assert "not a member of team:acme" in refused["message"]
    assert (await alice.request("join", "joined", room="team:acme"))["type"] == "joined"
    await alice.request("add_member", "ack", room="team:acme", user="bob")
    assert (await bob.request("join", "joined", room="team:acme"))["type"] == "joined"
    page = await alice.request("members", "members", room="team:acme")
    assert page["members"] == [{"user": "alice", "role": "owner"},
                               {"user": "bob", "role": "member"}]


async def test_create_twice_is_a_conflict_and_a_member_cannot_moderate(
        connect: ClientFactory) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    await alice.request("create", "ack", room="team:x")
    again = await bob.request("create", "ack", room="team:x")
    assert again["code"] == "conflict"
    await alice.request("add_member", "ack", room="team:x", user="bob")
    refused = await bob.request("ban", "ack", room="team:x", user="alice")
    assert (refused["type"], refused["code"]) == ("error", "forbidden")


async def test_an_unconfigured_namespace_is_refused(connect: ClientFactory) -> None:
    alice = await connect("alice")
    refused = await alice.request("join", "joined", room="secret:1")
    assert refused["code"] == "forbidden"


async def test_a_removed_member_gets_left_with_the_reason_and_nothing_more(
        connect: ClientFactory) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    bob2 = await connect("bob")
    await alice.request("create", "ack", room="team:r")
    await alice.request("add_member", "ack", room="team:r", user="bob")
    for c in (alice, bob, bob2):
        await c.request("join", "joined", room="team:r")
    await alice.request("remove_member", "ack", room="team:r", user="bob")
    for c in (bob, bob2):
        left = await c.expect("left", room="team:r")
        assert left["reason"] == "removed"
    await alice.request("send", "ack", room="team:r", text="after")
    await alice.expect("message", text="after")
    for c in (bob, bob2):
        await c.request("ping", "pong")
        assert not c.seen("message")
        answer = await c.request("send", "ack", room="team:r", text="still here?")
        assert answer["code"] == "not_joined"
        assert (await c.request("join", "joined", room="team:r"))["code"] == "forbidden"


async def test_a_ban_in_an_open_room_takes_the_room_and_refuses_the_next_join(
        connect: ClientFactory) -> None:
    admin = await connect(token=issue("root", role="admin"), user=None)
    bob = await connect("bob")
    await admin.request("join", "joined", room="general")
    await bob.request("join", "joined", room="general")
    await admin.request("ban", "ack", room="general", user="bob", duration=3600)
    left = await bob.expect("left", room="general")
    assert left["reason"] == "banned"
    refused = await bob.request("join", "joined", room="general")
    assert refused["code"] == "forbidden"
    assert refused["message"].startswith("banned")
    await admin.request("unban", "ack", room="general", user="bob")
    assert (await bob.request("join", "joined", room="general"))["type"] == "joined"


async def test_a_muted_user_still_receives_but_cannot_send(connect: ClientFactory) -> None:
    admin = await connect(token=issue("root", role="admin"), user=None)
    bob = await connect("bob")
    for c in (admin, bob):
        await c.request("join", "joined", room="general")
    await admin.request("mute", "ack", room="general", user="bob")
    # The mute reaches bob's seat through the room-change channel, a moment after the ack:
    # each round trip gives it that moment (no sleeping), a bounded number of times.
    for _ in range(50):
        answer = await bob.request("send", "ack", room="general", text="hi")
        if answer["type"] == "error":
            break
    assert (answer["code"], answer["message"].startswith("muted")) == ("forbidden", True)
    await admin.request("send", "ack", room="general", text="from admin")
    await bob.expect("message", text="from admin")


async def test_a_token_room_needs_the_claim_or_a_room_token(connect: ClientFactory) -> None:
    bob = await connect("bob")
    assert (await bob.request("join", "joined", room="paid:1"))["code"] == "forbidden"
    carol = await connect(token=issue("carol", rooms=["paid:*"]), user=None)
    assert (await carol.request("join", "joined", room="paid:1"))["type"] == "joined"
    granted = await bob.request("join", "joined", room="paid:1",
                                grant=room_token("bob", "paid:1"))
    assert granted["type"] == "joined"
    expired = issue_room_token(TokenIssuer(KeyRing.from_config(config_module.load(
        None, env={"CHATD_JWT_SECRET": SECRET}), env={})[0], clock=lambda: 1.0e9),
        "bob", "paid:2", 60, clock=lambda: 1.0e9)
    for wrong, reason in ((room_token("carol", "paid:2"), "token for another user"),
                          (room_token("bob", "paid:1"), "token for another room"),
                          (issue("bob"), "token type"), (expired, "expired")):
        refused = await bob.request("join", "joined", room="paid:2", grant=wrong)
        assert refused.get("code") == "forbidden", (reason, refused)
        assert reason in refused["message"]
        assert wrong not in refused["message"]
    assert (await bob.request("join", "joined", room="paid:2",
                              grant=room_token("bob", "paid:2")))["type"] == "joined"


async def test_a_full_room_refuses_another_user(connect: ClientFactory) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    assert (await alice.request("join", "joined", room="tiny:1"))["type"] == "joined"
    refused = await bob.request("join", "joined", room="tiny:1")
    assert (refused["code"], "full" in refused["message"]) == ("forbidden", True)
    alice2 = await connect("alice")
    assert (await alice2.request("join", "joined", room="tiny:1"))["type"] == "joined"


async def test_a_reload_applies_the_namespace_policies_to_new_joins(
        node: Node, connect: ClientFactory, tmp_path: Any) -> None:
    from tests.nodes import make_config

    alice = await connect("alice")
    assert (await alice.request("join", "joined", room="lab:1"))["code"] == "forbidden"
    config = make_config(tmp_path / "reloaded", rooms={"namespaces": [
        {"name": "lab", "access": "open"}]})
    node.apply(config, node.keyring)
    assert (await alice.request("join", "joined", room="lab:1"))["type"] == "joined"
