"""Authentication over real sockets: handshake tokens, first frames, expiry, renewal, accounts."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from websockets.exceptions import InvalidStatus

from chatd.server import Node
from tests.client import Client
from tests.conftest import ClientFactory, NodeFactory
from tests.nodes import issue


def url(node: Node, query: str = "") -> str:
    return f"ws://127.0.0.1:{node.port}/ws{query}"


async def refused(address: str, **kwargs: object) -> tuple[int, dict[str, str]]:
    with pytest.raises(InvalidStatus) as info:
        await Client.open(address, **kwargs)
    response = info.value.response
    return response.status_code, orjson.loads(response.body)


async def test_handshake_token_in_query_gets_welcome_first(node: Node) -> None:
    c = await Client.open(url(node, f"?token={issue('alice')}"))
    welcome = await c.recv()
    assert welcome["type"] == "welcome"
    assert welcome["user"] == "alice"
    assert welcome["node"] == "test"
    assert welcome["protocol"] == 1
    assert welcome["expires_at"] > time.time()
    await c.close()


async def test_handshake_token_in_authorization_header_is_accepted(node: Node) -> None:
    c = await Client.open(url(node), additional_headers={"Authorization": f"Bearer {issue('bob')}"})
    assert (await c.recv())["user"] == "bob"
    await c.close()


async def test_invalid_handshake_token_is_refused_with_401_before_the_upgrade(node: Node) -> None:
    status, body = await refused(url(node, "?token=not.a.jwt"))
    assert status == 401
    assert body["code"] == "unauthorized"
    assert "not.a.jwt" not in body["message"]


async def test_expired_handshake_token_answers_token_expired(node_factory: NodeFactory) -> None:
    node = await node_factory(auth={"leeway": 0})
    expired = issue("alice", ttl=10, issued_at=time.time() - 60)
    status, body = await refused(url(node, f"?token={expired}"))
    assert (status, body["code"]) == (401, "token_expired")


async def test_handshake_tokens_can_be_switched_off(node_factory: NodeFactory) -> None:
    node = await node_factory(auth={"handshake_token": False})
    status, body = await refused(url(node, f"?token={issue('alice')}"))
    assert status == 401
    assert "auth frame" in body["message"]


async def test_first_frame_auth_gets_welcome(node: Node) -> None:
    c = await Client.open(url(node))
    await c.send(type="auth", token=issue("carol"))
    assert (await c.expect("welcome"))["user"] == "carol"
    await c.close()


async def test_bad_token_in_first_frame_closes_4401_naming_the_cause(node: Node) -> None:
    c = await Client.open(url(node))
    await c.send(type="auth", token="garbage")
    code, reason = await c.closed()
    assert code == 4401
    assert reason == "malformed token"


async def test_other_first_frame_closes_4401(node: Node) -> None:
    c = await Client.open(url(node))
    await c.send(type="join", room="general")
    assert (await c.closed())[0] == 4401


async def test_no_auth_frame_within_timeout_closes_4408(node_factory: NodeFactory) -> None:
    node = await node_factory(auth={"timeout": 0.3})
    c = await Client.open(url(node))
    assert (await c.closed())[0] == 4408


async def test_expired_token_closes_live_connection_with_4001(node_factory: NodeFactory) -> None:
    node = await node_factory(auth={"leeway": 0, "expiry_grace": 0})
    c = await Client.open(url(node, f"?token={issue('alice', ttl=1)}"))
    await c.expect("welcome")
    code, reason = await c.closed(timeout=5)
    assert (code, reason) == (4001, "token expired")


async def test_in_band_auth_renews_and_keeps_connection_open(node_factory: NodeFactory) -> None:
    node = await node_factory(auth={"leeway": 0, "expiry_grace": 0})
    c = await Client.open(url(node, f"?token={issue('alice', ttl=1)}"))
    await c.expect("welcome")
    answer = await c.request("auth", "tokens", token=issue("alice", ttl=60))
    assert answer["type"] == "tokens"
    assert answer["expires_at"] > time.time() + 30
    await asyncio.sleep(1.5)  # past the first token's expiry: the point of the test is time
    assert (await c.request("ping", "pong"))["type"] == "pong"
    await c.close()


async def test_in_band_auth_for_another_user_is_forbidden(connect: ClientFactory) -> None:
    c = await connect("alice")
    answer = await c.request("auth", "tokens", token=issue("mallory"))
    assert (answer["type"], answer["code"]) == ("error", "forbidden")


async def test_login_answers_welcome_with_tokens_and_refresh_rotates(node: Node) -> None:
    await node.accounts.add_user("dave", "correct horse")
    c = await Client.open(url(node))
    await c.send(type="login", username="dave", password="correct horse", device="laptop")
    welcome = await c.expect("welcome")
    assert welcome["session"].startswith("s_")
    assert {"access_token", "refresh_token", "refresh_expires_at"} <= welcome.keys()
    rotated = await c.request("refresh", "tokens", refresh_token=welcome["refresh_token"])
    assert rotated["type"] == "tokens"
    assert rotated["refresh_token"] != welcome["refresh_token"]
    # The access token from login works for a second connection of the same session.
    other = await Client.open(url(node, f"?token={rotated['access_token']}"))
    assert (await other.expect("welcome"))["session"] == welcome["session"]
    # The first refresh token was rotated away: presenting it again revokes the session.
    third = await Client.open(url(node))
    await third.send(type="refresh", refresh_token=welcome["refresh_token"])
    assert (await third.closed())[0] == 4410
    assert (await c.closed())[0] == 4410
    assert (await other.closed())[0] == 4410


async def test_wrong_password_closes_4401(node: Node) -> None:
    await node.accounts.add_user("erin", "correct horse")
    c = await Client.open(url(node))
    await c.send(type="login", username="erin", password="wrong horse")
    assert await c.closed() == (4401, "invalid user name or password")


async def test_logout_closes_this_socket_1000_and_the_sessions_others_4410(node: Node) -> None:
    await node.accounts.add_user("fay", "correct horse")
    a = await Client.open(url(node))
    await a.send(type="login", username="fay", password="correct horse")
    welcome = await a.expect("welcome")
    b = await Client.open(url(node, f"?token={welcome['access_token']}"))
    await b.expect("welcome")
    await a.send(type="logout")
    assert (await a.closed())[0] == 1000
    assert (await b.closed())[0] == 4410
    status, _ = await refused(url(node, f"?token={welcome['access_token']}"))
    assert status == 401


async def test_admin_kick_closes_every_connection_of_the_user(connect: ClientFactory) -> None:
    victims = [await connect("bob"), await connect("bob")]
    admin = await connect(token=issue("root", role="admin"))
    assert (await admin.request("admin", "ack", op="kick", user="bob"))["type"] == "ack"
    for v in victims:
        assert (await v.closed())[0] == 4410


async def test_admin_disable_user_closes_4403_and_refuses_new_connections(
        node: Node, connect: ClientFactory) -> None:
    victim = await connect("bob")
    admin = await connect(token=issue("root", role="admin"))
    assert (await admin.request("admin", "ack", op="disable_user", user="bob"))["type"] == "ack"
    assert (await victim.closed())[0] == 4403
    status, body = await refused(url(node, f"?token={issue('bob')}"))
    assert (status, body["message"]) == (403, "user disabled")
    assert (await admin.request("admin", "ack", op="enable_user", user="bob"))["type"] == "ack"
    again = await connect("bob")
    assert (await again.request("ping", "pong"))["type"] == "pong"


async def test_admin_revoke_tokens_refuses_older_tokens(node: Node, connect: ClientFactory) -> None:
    old = issue("bob")
    victim = await connect(token=old)
    admin = await connect(token=issue("root", role="admin"))
    await admin.request("admin", "ack", op="revoke_tokens", user="bob")
    assert (await victim.closed())[0] == 4410
    assert (await refused(url(node, f"?token={old}")))[0] == 401


async def test_admin_command_without_admin_role_is_forbidden(connect: ClientFactory) -> None:
    c = await connect("bob")
    answer = await c.request("admin", "ack", op="kick", user="alice")
    assert (answer["type"], answer["code"]) == ("error", "forbidden")


async def test_token_within_leeway_but_past_the_grace_is_refused_as_expired(
        node_factory: NodeFactory) -> None:
    node = await node_factory(auth={"leeway": 30, "expiry_grace": 5})
    token = issue("alice", ttl=60, issued_at=time.time() - 70)  # exp 10 s ago
    status, body = await refused(url(node, f"?token={token}"))
    assert (status, body["code"]) == (401, "token_expired")
