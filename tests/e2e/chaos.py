"""A chaos driver for a chatd cluster: resuming clients, faults, and the invariants checked after.

Used by ``tests/e2e/test_chaos.py`` (the short CI version) and as the long-run command::

    .venv/bin/python -m tests.e2e.chaos --minutes 30 --nodes 3 --clients 300

which starts its own ``redis-server`` and ``chatd serve`` processes in a temporary directory,
injects a fault every ``--fault-every`` seconds for ``--minutes`` (half with Redis AOF on, half
without persistence, by default), stops by itself, checks the invariants and exits 0 (held) or 1.

Clients behave as ``docs/protocol.md`` asks a careful client to: reconnect with exponential
backoff and jitter to any node, rejoin every room with ``since`` = the last id seen there, and
treat ``recovered: false`` as "your copy may have a hole here". Each client keeps its *view* of
each room (the ids it received live or in a resumed ``joined.history``, in arrival order) and
where it was told about a hole; :func:`check` compares every view with what was acknowledged,
what any client saw, and what the room's history holds at the end (:mod:`chaos_invariants`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from tests.e2e.chaos_invariants import Report, Send, View, check, pack
from tests.nodes import ChatdProcess, issue
from tests.redis_server import RedisServer

#: Node configuration: short timeouts so faults are noticed fast, generous history so nothing
#: acknowledged is trimmed during a run, and no per-address accept limit (every client is
#: 127.0.0.1).
NODE_CONFIG = """
[server]
accept_rate_per_address = 0

[presence]
ttl = "3s"

[redis]
command_timeout = "1s"
probe_interval = "0.2s"

[limits]
rate = 1000.0
burst = 1000

[history]
max_per_room = 10000000
max_replay = 5000
"""

#: Reconnect backoff of the clients: first delay, cap (doubling, "equal jitter").
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
#: Seconds a command may wait for its answer on a live connection (the node answers
#: ``unavailable`` after ``redis.command_timeout``; longer means something is stuck).
ANSWER_TIMEOUT = 15.0
#: Largest frame a client accepts (a resumed ``joined`` holds up to ``max_replay`` messages).
MAX_FRAME = 1 << 24


class _Closed(Exception):
    """The connection closed before the answer came."""


@dataclasses.dataclass
class Settings:
    """The workload: who is in which room, and how fast they send."""

    clients: int = 150
    rooms: int = 8
    rooms_per_client: int = 2
    send_interval: float = 2.0  # mean seconds between two sends of one client
    token_ttl: float = 3600.0
    seed: int = 1


class Cluster:
    """One ``redis-server`` and several ``chatd serve`` processes, and the faults done to them.

    The methods block (they start processes and poll HTTP with deadlines): call them through
    ``asyncio.to_thread`` from the event loop that runs the clients.
    """

    def __init__(self, directory: Path, nodes: int, *, aof: bool) -> None:
        self.dir = directory
        self.aof = aof
        self.redis = RedisServer(directory / "redis", aof=aof)
        config = directory / "chaos.toml"
        config.write_text(NODE_CONFIG)
        env = {"CHATD_REDIS_URL": self.redis.url, "CHATD_LOG_LEVEL": "warning"}
        self.nodes = [ChatdProcess(directory / f"node{i}", config=config, node_id=f"node-{i}",
                                   env=env) for i in range(nodes)]
        self.faults: Counter[str] = Counter()
        #: monotonic times at which Redis was killed without persistence (data lost).
        self.data_lost_at: list[float] = []

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> None:
        self.redis.start()
        for n in self.nodes:
            n.start()
        self.wait_ready()

    def close(self) -> None:
        for n in self.nodes:
            n.kill()
        self.redis.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        for n in self.nodes:
            n.wait_http("/readyz", 200, timeout)

    def wait_unready(self, timeout: float = 15.0) -> None:
        for n in self.nodes:
            n.wait_http("/readyz", 503, timeout)

    def kill_nodes(self, which: Sequence[int]) -> None:
        """SIGKILL nodes (their clients lose the connection without a close frame), restart."""
        for i in which:
            self.nodes[i].kill()
        for i in which:
            self.nodes[i].start()
        for i in which:
            self.nodes[i].wait_http("/readyz", 200, 30)
        self.faults["node SIGKILL"] += len(which)

    def restart_redis(self) -> None:
        """SIGKILL Redis; once every node noticed (not ready), start it again on the same port."""
        if not self.aof:
            self.data_lost_at.append(time.monotonic())
        self.redis.kill()
        self.wait_unready()
        self.redis.start()
        self.wait_ready()
        mode = "AOF" if self.aof else "no persistence"
        self.faults[f"Redis SIGKILL + restart ({mode})"] += 1

    def pause_redis(self, hold: float = 0.0) -> None:
        """SIGSTOP Redis until every node reports not ready, then ``hold`` seconds more.

        Not ready takes the command timeout (a probe times out). With ``hold`` past the probe's
        staleness bound (``command_timeout + probe_interval``) the nodes also restart their
        pub/sub feed and tell their clients to resume (4004).
        """
        self.redis.pause()
        try:
            self.wait_unready()
            time.sleep(hold)  # the length of the fault, not a synchronisation
        finally:
            self.redis.resume()
        self.wait_ready()
        self.faults["Redis SIGSTOP + SIGCONT"] += 1


class ChaosClient:
    """One user with one connection at a time, in a few rooms, sending now and then."""

    def __init__(self, run: Chaos, index: int, rooms: list[str], token: str) -> None:
        self.run = run
        self.index = index
        self.rooms = rooms
        self.token = token
        self.rng = random.Random(run.settings.seed * 100003 + index)
        self.views = {room: View() for room in rooms}
        self.joined_once = asyncio.Event()
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.live: set[str] = set()  # rooms joined on the current connection
        self.refs = 0
        self.sent = 0
        self.ws: ClientConnection | None = None
        self.online = asyncio.Event()
        self.online.set()

    def drop(self) -> None:
        """Go offline: the connection is cut as a network loss would (no close frame)."""
        self.online.clear()
        if self.ws is not None:
            self.ws.transport.abort()

    async def main(self) -> None:
        """Connect, resume, send; on any failure back off and do it again, until told to stop."""
        stats = self.run.stats
        attempt = 0
        while not self.run.finished.done():
            if not self.online.is_set():
                back = asyncio.ensure_future(self.online.wait())
                await asyncio.wait({back, self.run.finished}, return_when="FIRST_COMPLETED")
                back.cancel()
                continue
            url = self.rng.choice(self.run.urls())
            try:
                ws = await connect(f"{url}?token={self.token}", compression=None,
                                   open_timeout=5, close_timeout=2, max_size=MAX_FRAME)
            except InvalidStatus as exc:
                stats[f"connect refused: HTTP {exc.response.status_code}"] += 1
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                stats[f"connect failed: {type(exc).__name__}"] += 1
            else:
                stats["connections"] += 1
                self.ws = ws
                if await self.session(ws):
                    attempt = 0
                self.ws = None
            if self.run.finished.done():
                break
            delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt)
            attempt = min(attempt + 1, 8)
            await self.run.pace(delay * (0.5 + self.rng.random() / 2))

    async def session(self, ws: ClientConnection) -> bool:
        """One connection: rejoin every room, then send until it closes. True if it resumed."""
        stats = self.run.stats
        reader = asyncio.create_task(self.read(ws))
        resumed = False
        try:
            answers = await asyncio.gather(*(self.request(ws, self.join_frame(room))
                                             for room in self.rooms))
            failed = [a for a in answers if a.get("type") != "joined"]
            if failed:
                stats[f"join answered {failed[0].get('code')}"] += 1
                return False
            resumed = True
            self.joined_once.set()
            await self.send_loop(ws, reader)
        except (_Closed, ConnectionClosed):
            pass
        except TimeoutError:
            stats["anomaly: no answer in time"] += 1
            self.run.note(f"client {self.index}: a command got no answer in {ANSWER_TIMEOUT} s")
        finally:
            if not reader.done():
                with contextlib.suppress(Exception):
                    await ws.close()
            await reader
            self.live.clear()
            stats[f"close {ws.close_code}"] += 1
        return resumed

    def join_frame(self, room: str) -> dict[str, Any]:
        last = self.views[room].last_id
        frame: dict[str, Any] = {"type": "join", "room": room}
        if last is not None:
            frame["since"] = last
            self.run.stats["resumes (join with since)"] += 1
        return frame

    async def request(self, ws: ClientConnection, frame: dict[str, Any]) -> dict[str, Any]:
        self.refs += 1
        ref = str(self.refs)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        # The reader may fail it while the send is still being written (and raises itself).
        fut.add_done_callback(_retrieve)
        self.pending[ref] = fut
        try:
            await ws.send(orjson.dumps({**frame, "ref": ref}).decode())
            async with asyncio.timeout(ANSWER_TIMEOUT):
                return await fut
        finally:
            self.pending.pop(ref, None)

    async def send_loop(self, ws: ClientConnection, reader: asyncio.Task[None]) -> None:
        run = self.run
        mean = run.settings.send_interval
        while not run.finished.done() and not reader.done():
            await run.pace(mean * (0.5 + self.rng.random()), reader)  # the workload's pace
            if not run.sending or run.finished.done() or reader.done():
                continue
            room = self.rng.choice(self.rooms)
            self.sent += 1
            record = Send(self.index, room, f"c{self.index}-{self.sent}", time.monotonic())
            run.sends.append(record)
            run.in_flight += 1
            try:
                answer = await self.request(ws, {"type": "send", "room": room,
                                                 "text": record.text})
            except (_Closed, ConnectionClosed):
                record.outcome = "unknown"  # stored or not: the ack, if any, was lost
                raise
            except TimeoutError:
                record.outcome = "unknown"
                raise
            finally:
                run.in_flight -= 1
            if answer.get("type") == "ack":
                record.outcome, record.id = "acked", answer["id"]
                run.acked()
            else:
                record.outcome = str(answer.get("code"))
                run.stats[f"send answered {record.outcome}"] += 1

    async def read(self, ws: ClientConnection) -> None:
        """Every frame of one connection, in order: views, answers, and nothing else."""
        stats = self.run.stats
        try:
            async for raw in ws:
                frame = orjson.loads(raw)
                kind = frame.get("type")
                if kind == "message":
                    room = frame.get("room")
                    if room not in self.live:
                        self.run.note(f"client {self.index}: a message of {room!r} before "
                                      "its joined")
                        continue
                    self.views[room].add(frame["id"])
                    stats["messages received live"] += 1
                elif kind == "joined":
                    room = frame["room"]
                    view = self.views[room]
                    if frame.get("recovered") is False:
                        view.told()
                        stats["joined recovered=false"] += 1
                    elif frame.get("recovered") is True:
                        stats["joined recovered=true"] += 1
                    for m in frame["history"]:
                        view.add(m["id"])
                    stats["messages received in joined.history"] += len(frame["history"])
                    self.live.add(room)
                if "ref" in frame:
                    fut = self.pending.get(frame["ref"])
                    if fut is not None and not fut.done():
                        fut.set_result(frame)
                elif kind == "error":
                    self.run.note(f"client {self.index}: error without ref: {frame}")
        except ConnectionClosed:
            pass
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(_Closed())


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class Chaos:
    """Clients against a cluster; :meth:`run` drives a fault schedule and returns the report."""

    def __init__(self, cluster: Cluster, settings: Settings) -> None:
        self.cluster = cluster
        self.settings = settings
        self.stats: Counter[str] = Counter()
        self.sends: list[Send] = []
        self.notes: list[str] = []
        self.sending = False
        self.in_flight = 0
        self.acks = 0
        self._ack_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.rooms = [f"room{r}" for r in range(settings.rooms)]
        rng = self.rng = random.Random(settings.seed)
        self.clients = [ChaosClient(self, i, rng.sample(self.rooms, settings.rooms_per_client),
                                    issue(f"user{i}", settings.token_ttl))
                        for i in range(settings.clients)]

    def urls(self) -> list[str]:
        return self.cluster.urls

    def note(self, text: str) -> None:
        self.stats["anomalies"] += 1
        if len(self.notes) < 50:
            self.notes.append(text)

    async def pace(self, seconds: float, *also: asyncio.Future[Any]) -> None:
        """Wait ``seconds`` (the workload's pace), less if the run finishes meanwhile."""
        await asyncio.wait({self.finished, *also}, timeout=seconds)

    def acked(self) -> None:
        self.acks += 1
        while self._ack_waiters and self._ack_waiters[0][0] <= self.acks:
            _, fut = self._ack_waiters.pop(0)
            if not fut.done():
                fut.set_result(None)

    async def traffic(self, acks: int, timeout: float = 60.0) -> None:
        """Wait until ``acks`` more sends were acknowledged: the cluster is carrying traffic."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ack_waiters.append((self.acks + acks, fut))
        self._ack_waiters.sort(key=lambda w: w[0])
        async with asyncio.timeout(timeout):
            await fut

    async def fault(self, action: Callable[[], None]) -> None:
        await asyncio.to_thread(action)

    def drop_clients(self, count: int) -> list[ChaosClient]:
        """Cut ``count`` random clients off until :meth:`back`: they miss what is sent meanwhile."""
        chosen = self.rng.sample(self.clients, count)
        for c in chosen:
            c.drop()
        self.stats["clients dropped offline"] += count
        return chosen

    def back(self, clients: list[ChaosClient] | None = None) -> None:
        for c in self.clients if clients is None else clients:
            c.online.set()

    async def run(self, schedule: Callable[[Chaos], Awaitable[None]]) -> Report:
        started = time.monotonic()
        await self._seed()
        tasks = [asyncio.create_task(c.main()) for c in self.clients]
        try:
            async with asyncio.timeout(60):
                for c in self.clients:
                    await c.joined_once.wait()
            self.sending = True
            await schedule(self)
            self.back()
            self.sending = False
            async with asyncio.timeout(ANSWER_TIMEOUT + 5):
                while self.in_flight:  # answers still expected: polled with a deadline
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(self.cluster.wait_ready)
            final = await self._audit()
            await self._catch_up(final)
        finally:
            self.sending = False
            if not self.finished.done():
                self.finished.set_result(None)
            for c in self.clients:
                if c.ws is not None:
                    with contextlib.suppress(Exception):
                        await c.ws.close()
            await asyncio.gather(*tasks)
        figures: dict[str, Any] = {
            "nodes": len(self.cluster.nodes), "clients": len(self.clients),
            "rooms": len(self.rooms), "persistence": "AOF" if self.cluster.aof else "none",
            "seconds": round(time.monotonic() - started, 1), **self.cluster.faults,
            **dict(sorted(self.stats.items()))}
        views = {(c.index, room): v for c in self.clients for room, v in c.views.items()}
        report = check(final, self.sends, views, aof=self.cluster.aof,
                       data_lost_at=self.cluster.data_lost_at, figures=figures)
        report.violations[:0] = [f"anomaly: {n}" for n in self.notes]
        return report

    async def _seed(self) -> None:
        """One acknowledged message per room, so every client's first join sees an id."""
        async with connect(f"{self.urls()[0]}?token={issue('seeder')}",
                           compression=None) as ws:
            for i, room in enumerate(self.rooms):
                for frame in ({"type": "join", "room": room},
                              {"type": "send", "room": room, "text": f"seed-{i}"}):
                    await ws.send(orjson.dumps({**frame, "ref": "s"}).decode())
                    while True:
                        answer = orjson.loads(await ws.recv())
                        if answer.get("ref") == "s":
                            break
                    assert answer["type"] in ("joined", "ack"), answer
                self.sends.append(Send(-1, room, f"seed-{i}", time.monotonic(), "acked",
                                       answer["id"]))

    async def _audit(self) -> dict[str, list[tuple[str, str]]]:
        """Each room's whole retained history, paged forward: (id, text) oldest first."""
        final: dict[str, list[tuple[str, str]]] = {}
        async with connect(f"{self.urls()[0]}?token={issue('auditor')}", compression=None,
                           max_size=MAX_FRAME) as ws:

            async def ask(frame: dict[str, Any]) -> dict[str, Any]:
                await ws.send(orjson.dumps({**frame, "ref": "a"}).decode())
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    while True:
                        answer: dict[str, Any] = orjson.loads(await ws.recv())
                        if answer.get("ref") == "a":
                            return answer

            for room in self.rooms:
                assert (await ask({"type": "join", "room": room}))["type"] == "joined"
                since, entries = "0-0", []
                while True:
                    page = await ask({"type": "history", "room": room, "since": since,
                                      "limit": 100})
                    assert page["type"] == "history", page
                    entries += [(m["id"], m["text"]) for m in page["messages"]]
                    if len(page["messages"]) < 100:
                        break
                    since = page["messages"][-1]["id"]
                final[room] = entries
        return final

    async def _catch_up(self, final: dict[str, list[tuple[str, str]]],
                        timeout: float = 60.0) -> None:
        """Wait (deadline) until every client holds each room's last id; laggards are reported."""
        targets = {room: pack(entries[-1][0]) for room, entries in final.items() if entries}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            behind = [c for c in self.clients for room in c.rooms
                      if room in targets and c.views[room].last < targets[room]]
            if not behind:
                return
            await asyncio.sleep(0.1)  # polling a condition under a deadline
        self.stats["clients that never caught up"] = len(
            {c.index for c in self.clients for room in c.rooms
             if room in targets and c.views[room].last < targets[room]})


# -- fault schedules ------------------------------------------------------------------------------


def random_schedule(seconds: float, fault_every: float, seed: int,
                    acks_between: int = 100) -> Callable[[Chaos], Awaitable[None]]:
    """Faults picked at random every ``fault_every`` seconds for ``seconds`` (the long run)."""

    async def schedule(chaos: Chaos) -> None:
        rng = random.Random(seed)
        cluster = chaos.cluster
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(min(fault_every, max(0.0, end - time.monotonic())))  # pacing
            if time.monotonic() >= end:
                break
            kind = rng.choice(["node", "node", "two nodes", "redis restart", "redis pause"])
            n = len(cluster.nodes)
            # A tenth of the clients, at times, is offline across the fault and misses traffic.
            dropped = chaos.drop_clients(len(chaos.clients) // 10) if rng.random() < 0.3 else []
            if dropped:
                await chaos.traffic(acks_between, timeout=120)
            if kind == "node" or (kind == "two nodes" and n < 3):
                which = [rng.randrange(n)]
                await chaos.fault(lambda w=which: cluster.kill_nodes(w))
            elif kind == "two nodes":
                which = rng.sample(range(n), 2)
                await chaos.fault(lambda w=which: cluster.kill_nodes(w))
            elif kind == "redis restart":
                await chaos.fault(cluster.restart_redis)
            else:
                hold = rng.uniform(0, 4)
                await chaos.fault(lambda h=hold: cluster.pause_redis(h))
            chaos.back(dropped)
            await chaos.traffic(acks_between, timeout=120)

    return schedule


# -- the long-run command ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.e2e.chaos",
        description="Chaos run against a chatd cluster (real processes, real Redis); "
                    "exit 0 when every invariant held, 1 otherwise.")
    p.add_argument("--minutes", type=float, default=30.0,
                   help="duration of the traffic and faults, 0.5-1440 (default 30)")
    p.add_argument("--nodes", type=int, default=3, help="chatd nodes, 1-8 (default 3)")
    p.add_argument("--clients", type=int, default=300, help="clients, 1-3000 (default 300)")
    p.add_argument("--rooms", type=int, default=10, help="rooms (default 10)")
    p.add_argument("--rooms-per-client", type=int, default=2)
    p.add_argument("--send-interval", type=float, default=3.0,
                   help="mean seconds between two sends of one client (default 3)")
    p.add_argument("--fault-every", type=float, default=20.0,
                   help="seconds between faults (default 20)")
    p.add_argument("--persistence", choices=["aof", "none", "both"], default="both",
                   help="Redis persistence; 'both' runs half the time with each (default)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", type=Path, help="keep logs and data in this directory")
    p.add_argument("--json", type=Path, help="also write the reports here as JSON")
    return p


async def _phase(directory: Path, args: argparse.Namespace, *, aof: bool, seconds: float,
                 seed: int) -> Report:
    cluster = Cluster(directory, args.nodes, aof=aof)
    await asyncio.to_thread(cluster.start)
    try:
        settings = Settings(clients=args.clients, rooms=args.rooms,
                            rooms_per_client=args.rooms_per_client,
                            send_interval=args.send_interval, token_ttl=seconds + 3600,
                            seed=seed)
        chaos = Chaos(cluster, settings)
        return await chaos.run(random_schedule(seconds, args.fault_every, seed))
    finally:
        await asyncio.to_thread(cluster.close)


async def _main(args: argparse.Namespace, directory: Path) -> list[Report]:
    modes = {"aof": [True], "none": [False], "both": [True, False]}[args.persistence]
    seconds = args.minutes * 60 / len(modes)
    reports = []
    # Bounded in time: a phase that overruns its traffic time by 10 minutes is a failure.
    for i, aof in enumerate(modes):
        async with asyncio.timeout(seconds + 600):
            reports.append(await _phase(directory / ("aof" if aof else "none"), args, aof=aof,
                                        seconds=seconds, seed=args.seed + i))
        print(reports[-1].summary(), flush=True)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    checks = [(0.5 <= args.minutes <= 1440, "--minutes must be within 0.5-1440"),
              (1 <= args.nodes <= 8, "--nodes must be within 1-8"),
              (1 <= args.clients <= 3000, "--clients must be within 1-3000"),
              (1 <= args.rooms_per_client <= args.rooms <= 100,
               "need 1 <= --rooms-per-client <= --rooms <= 100"),
              (args.send_interval >= 0.05, "--send-interval must be at least 0.05"),
              (args.fault_every >= 2, "--fault-every must be at least 2")]
    for ok, message in checks:
        if not ok:
            print(f"chaos: {message}", file=sys.stderr)
            return 2
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            directory = args.keep
            directory.mkdir(parents=True, exist_ok=True)
        else:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        reports = asyncio.run(_main(args, directory))
    if args.json is not None:
        args.json.write_text(json.dumps([r.as_dict() for r in reports], indent=2))
    return 0 if all(r.held for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
