"""End-to-end cluster fixtures: one real ``redis-server`` and several ``chatd serve`` processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.nodes import ChatdProcess
from tests.redis_server import RedisServer

CLUSTER_CONFIG = """
[presence]
ttl = "3s"

[redis]
command_timeout = "2s"
probe_interval = "0.2s"

[limits]
rate = 2000.0
burst = 2000
"""


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", aof=True).start()
    yield server
    server.close()


Cluster = Callable[[int], list[ChatdProcess]]


@pytest.fixture
def cluster(tmp_path: Path, redis: RedisServer) -> Iterator[Cluster]:
    """``cluster(n)`` starts n nodes against the Redis fixture; all are stopped afterwards."""
    procs: list[ChatdProcess] = []
    config = tmp_path / "cluster.toml"
    config.write_text(CLUSTER_CONFIG)

    def start(n: int) -> list[ChatdProcess]:
        started = []
        for _ in range(n):
            i = len(procs)
            p = ChatdProcess(tmp_path / f"node{i}", config=config, node_id=f"node-{i}",
                             env={"CHATD_REDIS_URL": redis.url})
            procs.append(p)
            started.append(p.start())
        for p in started:
            p.wait_http("/readyz", 200)
        return started

    yield start
    for p in procs:
        p.kill()
