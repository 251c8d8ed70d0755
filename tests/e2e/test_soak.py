"""Memory soak: connection churn and traffic against one ``chatd serve`` for a fixed time.

Clients connect (handshake token or first-frame ``auth``), join rooms, send, read, ask for
history and ``who``, and leave — closing cleanly, or vanishing without a close frame — over and
over, while resident members receive the rooms' traffic. The node's resident set size
(``VmRSS`` in ``/proc/PID/status``) is sampled once a second; after a warm-up (room histories
full, allocator pools grown) it must stay flat: growth at most :data:`GROWTH_BOUND_MB`.

Why that bound catches a leak: every churned connection costs the node tens of kilobytes while
open (websockets buffers, session, hub entries). A node that kept each closed connection, or its
room memberships, would grow by tens of megabytes over the thousands of connections made here
(see docs/reliability.md for the measured figures).

The user and room names come from fixed pools, and history is capped small, so legitimate state
reaches its steady size during the warm-up: anything that grows after it is a leak.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.nodes import ChatdProcess, issue
from tests.redis_server import RedisServer

#: Seconds of warm-up, then of measured soak (CI); RSS growth allowed over the measured part.
WARMUP = 8.0
SOAK = 16.0
GROWTH_BOUND_MB = 6.0

USERS = 200
ROOMS = 40
CHURNERS = 24
RESIDENTS = 20

CONFIG = """
[server]
accept_rate_per_address = 0

[limits]
rate = 1000.0
burst = 1000

[history]
max_per_room = 50
max_replay = 50
on_join = 10
"""


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Load:
    """Churn and traffic against one node until :attr:`stop` is set."""

    def __init__(self, url: str, seed: int = 7) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.tokens = [issue(f"soak{i}", 3600) for i in range(USERS)]
        self.rooms = [f"soak-room{r}" for r in range(ROOMS)]
        self.stop = asyncio.Event()
        self.counts: Counter[str] = Counter()

    async def ask(self, ws: ClientConnection, frame: dict[str, object]) -> dict[str, object]:
        """Send a command with a ref and read until its answer (other frames are traffic)."""
        self.counts["commands"] += 1
        await ws.send(orjson.dumps({**frame, "ref": "q"}).decode())
        async with asyncio.timeout(10):
            while True:
                answer = orjson.loads(await ws.recv())
                if answer.get("ref") == "q":
                    assert answer["type"] != "error", answer
                    return answer  # type: ignore[no-any-return]

    async def churner(self) -> None:
        rng = self.rng
        while not self.stop.is_set():
            token = rng.choice(self.tokens)
            first_frame = rng.random() < 0.3
            url = self.url if first_frame else f"{self.url}?token={token}"
            try:
                ws = await connect(url, compression=None, open_timeout=10)
            except (OSError, InvalidHandshake, TimeoutError):
                self.counts["connect failed"] += 1
                continue
            try:
                if first_frame:
                    await ws.send(orjson.dumps({"type": "auth", "token": token}).decode())
                assert orjson.loads(await ws.recv())["type"] == "welcome"
                self.counts["connections"] += 1
                rooms = rng.sample(self.rooms, rng.randint(1, 3))
                for room in rooms:
                    await self.ask(ws, {"type": "join", "room": room})
                for _ in range(rng.randint(0, 4)):
                    await self.ask(ws, {"type": "send", "room": rng.choice(rooms),
                                        "text": "x" * rng.randint(1, 300)})
                    self.counts["messages"] += 1
                if rng.random() < 0.3:
                    await self.ask(ws, {"type": "history", "room": rooms[0], "limit": 20})
                    await self.ask(ws, {"type": "who", "room": rooms[0]})
                if rng.random() < 0.3:
                    await self.ask(ws, {"type": "leave", "room": rooms[-1]})
                if rng.random() < 0.25:
                    ws.transport.abort()  # gone without a close frame
                    self.counts["aborted"] += 1
            except ConnectionClosed:
                self.counts["closed by the node"] += 1
            finally:
                await ws.close()

    async def resident(self, i: int) -> None:
        """A member that stays, reading its rooms' traffic (keeps fan-out going)."""
        async with connect(f"{self.url}?token={self.tokens[i]}", compression=None) as ws:
            await ws.recv()
            for room in self.rooms[i::RESIDENTS]:
                await ws.send(orjson.dumps({"type": "join", "room": room}).decode())
            while not self.stop.is_set():
                with_deadline = asyncio.ensure_future(ws.recv())
                stopping = asyncio.ensure_future(self.stop.wait())
                await asyncio.wait({with_deadline, stopping}, return_when="FIRST_COMPLETED")
                stopping.cancel()
                if not with_deadline.done():
                    with_deadline.cancel()
                    break
                with_deadline.result()
                self.counts["received by residents"] += 1


async def soak(node: ChatdProcess, warmup: float, seconds: float) -> tuple[list[int], Counter[str]]:
    """Run the load; RSS samples (KiB), one a second, the first at the end of the warm-up."""
    assert node.proc is not None
    load = Load(node.url)
    tasks = [asyncio.create_task(load.resident(i)) for i in range(RESIDENTS)]
    tasks += [asyncio.create_task(load.churner()) for _ in range(CHURNERS)]
    samples: list[int] = []
    try:
        start = time.monotonic()
        await asyncio.sleep(warmup)  # the workload runs: this is its length, not a sync point
        connections_at_warmup = load.counts["connections"]
        while time.monotonic() - start < warmup + seconds:
            samples.append(rss_kib(node.proc.pid))
            await asyncio.sleep(1.0)  # the sampling period
        samples.append(rss_kib(node.proc.pid))
        load.counts["connections measured"] = load.counts["connections"] - connections_at_warmup
    finally:
        load.stop.set()
        await asyncio.gather(*tasks)
    return samples, load.counts


@pytest.fixture(params=["embedded", "redis"])
def soak_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChatdProcess]:
    config = tmp_path / "soak.toml"
    config.write_text(CONFIG)
    env: dict[str, str] = {"CHATD_LOG_LEVEL": "warning"}
    redis = None
    if request.param == "redis":
        redis = RedisServer(tmp_path / "redis").start()
        env["CHATD_REDIS_URL"] = redis.url
    node = ChatdProcess(tmp_path / "node", config=config, node_id="soak", env=env)
    try:
        node.start().wait_http("/readyz", 200)
        yield node
    finally:
        node.kill()
        if redis is not None:
            redis.close()


@pytest.mark.e2e
@pytest.mark.redis
async def test_rss_stays_flat_under_connection_churn_and_traffic(
        soak_node: ChatdProcess) -> None:
    samples, counts = await soak(soak_node, WARMUP, SOAK)
    growth_mb = (samples[-1] - samples[0]) / 1024
    peak_mb = (max(samples) - samples[0]) / 1024
    print(f"\nRSS after warm-up {samples[0] / 1024:.1f} MB, at the end "
          f"{samples[-1] / 1024:.1f} MB (growth {growth_mb:+.2f} MB, peak {peak_mb:+.2f} MB) "
          f"over {counts['connections measured']} connections; {dict(counts)}")
    assert counts["connections measured"] >= 1000, counts  # the churn really happened
    assert counts["closed by the node"] == 0, counts
    assert growth_mb < GROWTH_BOUND_MB, samples
