"""Several real ``chatd serve`` processes sharing one real Redis (issue: multi-node chatd)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.client import Client
from tests.e2e.conftest import Cluster
from tests.nodes import ChatdProcess, issue
from tests.redis_server import RedisServer


async def login(node: ChatdProcess, user: str) -> Client:
    c = await Client.open(f"{node.url}?token={issue(user)}")
    assert (await c.expect("welcome"))["node"] == node.node_id
    return c


async def test_a_room_spanning_nodes_delivers_every_message_once_in_one_order(
        cluster: Cluster) -> None:
    a, b, c = cluster(3)
    clients = [await login(a, "alice"), await login(b, "bob"), await login(c, "carol"),
               await login(b, "bob")]
    for cl in clients:
        await cl.request("join", "joined", room="big")
    total = 1000
    acked: list[str] = []

    async def sender(cl: Client, start: int) -> None:
        for i in range(start, total, len(clients)):
            acked.append((await cl.request("send", "ack", room="big", text=f"m{i}"))["id"])

    await asyncio.gather(*(sender(cl, i) for i, cl in enumerate(clients)))
    orders = []
    for cl in clients:
        ids = [(await cl.expect("message"))["id"] for _ in range(total)]
        orders.append(ids)
    assert all(order == orders[0] for order in orders)
    assert len(set(orders[0])) == total
    assert sorted(orders[0], key=lambda i: tuple(map(int, i.split("-")))) == orders[0]
    assert set(acked) == set(orders[0])
    for cl in clients:
        await cl.request("ping", "pong")
        assert len(cl.seen("message")) == total  # nothing extra arrived afterwards


async def test_direct_messages_and_who_work_across_nodes(cluster: Cluster) -> None:
    a, b = cluster(2)
    alice, bob = await login(a, "alice"), await login(b, "bob")
    ack = await alice.request("send", "ack", to="bob", text="across")
    got = await bob.expect("message")
    assert (got["id"], got["from"], got["to"]) == (ack["id"], "alice", "bob")
    await alice.request("join", "joined", room="g")
    await bob.request("join", "joined", room="g")
    assert (await alice.request("who", "who", room="g"))["members"] == ["alice", "bob"]
    assert await alice.expect("presence", user="bob", status="online")


async def test_resume_after_reconnecting_to_another_node_is_recovered(cluster: Cluster) -> None:
    a, b = cluster(2)
    alice, bob = await login(a, "alice"), await login(a, "bob")
    await alice.request("join", "joined", room="g")
    await bob.request("join", "joined", room="g")
    last_seen = (await alice.request("send", "ack", room="g", text="before"))["id"]
    await bob.expect("message", id=last_seen)
    await bob.close()
    missed = [(await alice.request("send", "ack", room="g", text=f"gap{i}"))["id"]
              for i in range(5)]
    bob = await login(b, "bob")
    joined = await bob.request("join", "joined", room="g", since=last_seen)
    assert joined["recovered"] is True
    assert [m["id"] for m in joined["history"]] == missed


async def test_a_killed_node_leaves_no_ghost_in_who(cluster: Cluster) -> None:
    a, b = cluster(2)
    alice = await login(a, "alice")
    await alice.request("join", "joined", room="g")
    bob = await login(b, "bob")
    await bob.request("join", "joined", room="g")
    assert (await alice.request("who", "who", room="g"))["members"] == ["alice", "bob"]
    b.signal(signal.SIGKILL)
    b.wait()
    offline = await alice.expect("presence", timeout=10, user="bob", status="offline")
    assert offline["room"] == "g"
    assert (await alice.request("who", "who", room="g"))["members"] == ["alice"]


async def test_kick_reaches_sockets_on_every_node(cluster: Cluster) -> None:
    a, b = cluster(2)
    victims = [await login(a, "mallory"), await login(b, "mallory")]
    admin = await Client.open(f"{a.url}?token={issue('root', role='admin')}")
    await admin.expect("welcome")
    await admin.request("admin", "ack", op="kick", user="mallory")
    for v in victims:
        assert (await v.closed(timeout=1.5))[0] == 4410


async def test_redis_restart_during_traffic_tells_clients_to_resume_and_loses_nothing_acked(
        cluster: Cluster, redis: RedisServer) -> None:
    (a,) = cluster(1)
    alice = await login(a, "alice")
    await alice.request("join", "joined", room="g")
    acked = [(await alice.request("send", "ack", room="g", text=f"m{i}"))["id"] for i in range(20)]
    redis.kill()
    a.wait_http("/readyz", 503)
    answer = await alice.request("send", "ack", room="g", text="while down")
    assert (answer["type"], answer["code"]) == ("error", "unavailable")
    redis.start()
    # The pub/sub feed was interrupted: the node cannot know what it missed, so it tells
    # every client to resume.
    assert (await alice.closed(timeout=10))[0] == 4004
    a.wait_http("/readyz", 200)
    alice = await login(a, "alice")
    joined = await alice.request("join", "joined", room="g", since=acked[0])
    assert [m["id"] for m in joined["history"]] == acked[1:]
    assert joined["recovered"] is True


async def test_paused_redis_answers_unavailable_and_recovers(cluster: Cluster,
                                                           redis: RedisServer) -> None:
    (a,) = cluster(1)
    alice = await login(a, "alice")
    await alice.request("join", "joined", room="g")
    redis.pause()
    try:
        answer = await alice.request("send", "ack", room="g", text="into the void")
        assert (answer["type"], answer["code"]) == ("error", "unavailable")
        a.wait_http("/readyz", 503)
        # A first-frame login cannot be checked against the state: try again later, no crash.
        late = await Client.open(a.url)
        await late.send(type="auth", token=issue("bob"))
        assert (await late.closed(timeout=5))[0] == 1013
    finally:
        redis.resume()
    a.wait_http("/readyz", 200)
    # The node may have told clients to resume (4004) if the feed was interrupted; either way
    # a fresh connection works and nothing acknowledged is missing.
    fresh = await login(a, "alice")
    await fresh.request("join", "joined", room="g")
    assert (await fresh.request("send", "ack", room="g", text="back"))["type"] == "ack"


def add_user(redis: RedisServer, state_dir: Path, name: str, password: str) -> None:
    """``chatd user add`` against the cluster's Redis, as an operator would."""
    env = {**os.environ, "CHATD_REDIS_URL": redis.url, "CHATD_STATE_DIR": str(state_dir)}
    subprocess.run([sys.executable, "-m", "chatd", "user", "add", name, "--password-stdin"],
                   input=password + "\n", text=True, env=env, check=True, capture_output=True)


async def login_password(node: ChatdProcess, user: str, password: str) -> tuple[Client, dict]:
    c = await Client.open(node.url)
    await c.send(type="login", username=user, password=password, device="test")
    return c, await c.expect("welcome")


async def test_reused_refresh_token_kills_the_session_on_every_node(
        cluster: Cluster, redis: RedisServer, tmp_path: Path) -> None:
    a, b = cluster(2)
    add_user(redis, tmp_path / "cli", "dana", "correct horse")
    on_a, welcome = await login_password(a, "dana", "correct horse")
    on_b = await Client.open(f"{b.url}?token={welcome['access_token']}")
    assert (await on_b.expect("welcome"))["session"] == welcome["session"]
    rotated = await on_a.request("refresh", "tokens", refresh_token=welcome["refresh_token"])
    assert rotated["type"] == "tokens"
    thief = await Client.open(b.url)
    await thief.send(type="refresh", refresh_token=welcome["refresh_token"])
    assert (await thief.closed())[0] == 4410
    assert (await on_a.closed(timeout=1.5))[0] == 4410
    assert (await on_b.closed(timeout=1.5))[0] == 4410
    late = await Client.open(a.url)
    await late.send(type="refresh", refresh_token=rotated["refresh_token"])
    assert (await late.closed())[0] in (4401, 4410)


async def test_logout_on_one_node_closes_the_sessions_socket_on_another(
        cluster: Cluster, redis: RedisServer, tmp_path: Path) -> None:
    a, b = cluster(2)
    add_user(redis, tmp_path / "cli", "eve", "correct horse")
    on_a, welcome = await login_password(a, "eve", "correct horse")
    on_b = await Client.open(f"{b.url}?token={welcome['access_token']}")
    await on_b.expect("welcome")
    await on_a.send(type="logout")
    assert (await on_a.closed())[0] == 1000
    assert (await on_b.closed(timeout=1.5))[0] == 4410
    assert b.status("/readyz") == 200


async def test_acknowledged_messages_survive_a_redis_restart_under_traffic(
        cluster: Cluster, redis: RedisServer) -> None:
    """Redis (AOF on) is killed while a sender sends continuously: every ack it got is kept."""
    a, b = cluster(2)
    acked: list[str] = []
    stop = asyncio.Event()

    async def send_forever() -> None:
        i = 0
        while not stop.is_set():
            try:
                sender = await login(a, "alice")
                await sender.request("join", "joined", room="live")
                while not stop.is_set():
                    answer = await sender.request("send", "ack", room="live", text=f"m{i}")
                    i += 1
                    if answer["type"] == "ack":
                        acked.append(answer["id"])
                    await asyncio.sleep(0.005)  # the workload's pace
            except (ConnectionClosed, OSError, InvalidStatus, TimeoutError):
                await asyncio.sleep(0.2)  # reconnect backoff

    task = asyncio.create_task(send_forever())
    while len(acked) < 50:
        await asyncio.sleep(0.05)
    redis.kill()
    b.wait_http("/readyz", 503)
    redis.start()
    b.wait_http("/readyz", 200)
    before = len(acked)
    while len(acked) < before + 50:
        await asyncio.sleep(0.05)
    stop.set()
    await task
    reader = await login(b, "bob")
    await reader.request("join", "joined", room="live")
    stored: list[str] = []
    since = "0-0"
    while True:  # page forward through the whole retained history
        page = await reader.request("history", "history", room="live", limit=100, since=since)
        ids = [m["id"] for m in page["messages"]]
        stored += ids
        if len(ids) < 100:
            break
        since = ids[-1]
    assert set(acked) <= set(stored)
    assert len(stored) == len(set(stored))


async def test_a_drained_node_removes_its_presence_at_once(redis: RedisServer,
                                                           tmp_path: Path) -> None:
    """SIGTERM: the node's users leave the room now, not after presence.ttl (60 s here)."""
    config = tmp_path / "long-ttl.toml"
    config.write_text('[presence]\nttl = "60s"\n[server]\ndrain_window = "0.2s"\n')
    env = {"CHATD_REDIS_URL": redis.url}
    a = ChatdProcess(tmp_path / "a", config=config, node_id="node-a", env=env).start()
    b = ChatdProcess(tmp_path / "b", config=config, node_id="node-b", env=env).start()
    try:
        for node in (a, b):
            node.wait_http("/readyz", 200)
        alice, bob = await login(a, "alice"), await login(b, "bob")
        await alice.request("join", "joined", room="g")
        await bob.request("join", "joined", room="g")
        b.signal(signal.SIGTERM)
        assert (await bob.closed())[0] == 1001
        await alice.expect("presence", timeout=5, user="bob", status="offline")
        assert (await alice.request("who", "who", room="g"))["members"] == ["alice"]
        assert await asyncio.to_thread(b.wait) == 0
    finally:
        a.kill()
        b.kill()


async def test_a_ban_on_one_node_takes_the_room_from_the_users_sockets_on_another(
        cluster: Cluster) -> None:
    a, b = cluster(2)
    admin = await Client.open(f"{a.url}?token={issue('root', role='admin')}")
    await admin.expect("welcome")
    bob_b, bob_a = await login(b, "bob"), await login(a, "bob")
    for cl in (admin, bob_b, bob_a):
        await cl.request("join", "joined", room="general")
    start = asyncio.get_running_loop().time()
    await admin.request("ban", "ack", room="general", user="bob", duration=600)
    for cl in (bob_b, bob_a):
        assert (await cl.expect("left", room="general", timeout=1.0))["reason"] == "banned"
    assert asyncio.get_running_loop().time() - start < 1.0
    await admin.request("send", "ack", room="general", text="not for bob")
    await admin.expect("message", text="not for bob")
    for cl in (bob_b, bob_a):
        await cl.request("ping", "pong")
        assert not cl.seen("message")
    refused = await bob_b.request("join", "joined", room="general")
    assert (refused["code"], refused["message"].startswith("banned")) == ("forbidden", True)
