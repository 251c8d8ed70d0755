"""A node whose Redis is missing or hung when it starts: it serves, says not ready, then recovers.

``chatd serve`` with ``CHATD_REDIS_URL`` must not crash or refuse to start when Redis is not
there yet (a reboot brings services up in any order): ``/healthz`` answers 200, ``/readyz`` 503,
clients are told to come back later (HTTP 503 before the upgrade, or close 1013 after a
first-frame ``auth``), and the node becomes ready by itself once Redis answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.client import Client
from tests.nodes import ChatdProcess, issue
from tests.redis_server import RedisServer, free_port

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

CONFIG = """
[redis]
command_timeout = "1s"
probe_interval = "0.2s"
"""


@pytest.fixture
def node_and_port(tmp_path: Path) -> Iterator[tuple[ChatdProcess, int]]:
    """A node (not started) configured for Redis on a free port where nothing listens yet."""
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(CONFIG)
    node = ChatdProcess(tmp_path / "node", config=config, node_id="node-a",
                        env={"CHATD_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    yield node, port
    node.kill()


async def refused_until_ready(node: ChatdProcess) -> None:
    """What a client meets while the node has no Redis: 503 at the handshake, 1013 after auth."""
    assert node.status("/healthz") == 200
    assert node.status("/readyz") == 503
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{node.url}?token={issue('alice')}", compression=None):
            pass
    response = refused.value.response
    assert response.status_code == 503
    assert orjson.loads(response.body)["code"] == "unavailable"
    late = await Client.open(node.url)
    await late.send(type="auth", token=issue("bob"))
    assert (await late.closed(timeout=10))[0] == 1013
    assert node.proc is not None and node.proc.poll() is None


async def works(node: ChatdProcess) -> None:
    alice = await Client.open(f"{node.url}?token={issue('alice')}")
    assert (await alice.expect("welcome"))["node"] == "node-a"
    assert (await alice.request("join", "joined", room="g"))["type"] == "joined"
    ack = await alice.request("send", "ack", room="g", text="hello")
    assert ack["type"] == "ack"
    assert (await alice.expect("message"))["id"] == ack["id"]
    assert "Traceback" not in node.log()


async def test_a_node_started_before_its_redis_is_unready_until_redis_appears(
        node_and_port: tuple[ChatdProcess, int], tmp_path: Path) -> None:
    node, port = node_and_port
    node.start()  # waits for /healthz 200: it started without Redis
    await refused_until_ready(node)
    redis = RedisServer(tmp_path / "redis", port=port).start()
    try:
        node.wait_http("/readyz", 200, timeout=15)
        await works(node)
    finally:
        redis.close()


async def test_a_node_started_while_redis_hangs_is_unready_until_redis_resumes(
        node_and_port: tuple[ChatdProcess, int], tmp_path: Path) -> None:
    node, port = node_and_port
    redis = RedisServer(tmp_path / "redis", port=port).start()
    try:
        redis.pause()  # accepts TCP connections (the kernel does), answers nothing
        try:
            node.start()
            await refused_until_ready(node)
        finally:
            redis.resume()
        node.wait_http("/readyz", 200, timeout=15)
        await works(node)
    finally:
        redis.close()
