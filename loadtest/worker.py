"""A worker process: drives its share of a :class:`~loadtest.scenarios.Plan` on one event loop.

Clocks: a message's text is ``LT:<sender>:<seq>:<intended_ns>:<padding>``, where ``intended_ns`` is
the *sending process's* ``time.monotonic_ns()`` at the intended send time. Every worker runs both
senders and receivers, and a worker computes a latency only for a message whose sender it runs
itself (``sender % W == w``), so only one process ever compares its own clocks; the other
deliveries still count for throughput, loss and duplicates. With round-robin assignment a worker
holds 1/W of every room's members, so the timed deliveries are an unbiased 1/W sample.

Loss and duplicates need no clocks: each receiving connection keeps, per sender, one byte per
sequence number. At the end the coordinator gathers which sequence numbers each sender had
acknowledged (``ack``) and every worker counts, for each of its connections and each sender it
should hear, the acknowledged messages it never received.

Talks to the coordinator over a :class:`multiprocessing.connection.Connection`: see
:mod:`loadtest.runner` for the exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import os
import resource
import threading
import time
from array import array
from collections import Counter
from multiprocessing.connection import Connection as Pipe
from typing import Any

import orjson

from loadtest.client import Client, ConnectFailed, failure_reason, open_client, resolve
from loadtest.scenarios import ChurnSpec, Plan, SenderSpec
from loadtest.tokens import mint

#: Width of a timeline bin, seconds.
BIN = 0.25
#: How often progress goes to the coordinator, seconds.
PROGRESS_EVERY = 0.25
#: SO_RCVBUF of a slow consumer: a small window makes the server's buffer fill quickly.
SLOW_RCVBUF = 4096


def cpu_seconds() -> float:
    """CPU time (user + system) of this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Target:
    """Where connection ``i`` goes: URL list round-robin, source address round-robin.

    Connection ``i`` belongs to worker ``i % W``; it goes to node ``(i // W) % nodes``, so every
    worker has connections on every node (with ``i % nodes`` and as many workers as nodes, each
    worker would only ever talk to one node, and its timed deliveries would all be node-local).
    """

    def __init__(self, urls: list[str], source_addrs: list[str], nworkers: int = 1) -> None:
        self.urls = urls
        self.resolved = [resolve(u) for u in urls]
        self.sources = source_addrs
        self.nworkers = max(1, nworkers)

    def pick(self, i: int) -> tuple[str, int, tuple[Any, ...], str | None]:
        k = (i // self.nworkers) % len(self.urls) if i >= 0 else i % len(self.urls)
        family, addr = self.resolved[k]
        src = self.sources[i % len(self.sources)] if self.sources else None
        return self.urls[k], family, addr, src


class Conn:
    """One connection's state in the worker; ``on_text`` is the hot path of the harness."""

    __slots__ = (
        "client",
        "closed_code",
        "dups",
        "error",
        "idx",
        "joined",
        "recv",
        "rooms",
        "slow",
        "stable",
        "user",
        "w",
        "waiter",
    )

    def __init__(self, w: Worker, idx: int, user: str, rooms: tuple[str, ...], slow: bool,
                 stable: bool) -> None:
        self.w = w
        self.idx = idx
        self.user = user
        self.rooms = rooms
        self.slow = slow
        self.stable = stable
        self.client: Client | None = None
        self.recv: dict[int, bytearray] = {}
        self.dups = 0
        self.joined = 0
        self.waiter: asyncio.Future[None] | None = None
        self.error = ""
        self.closed_code: int | None = None

    def on_text(self, data: bytes) -> None:
        now = time.monotonic_ns()
        w = self.w
        w.frames += 1
        try:
            frame = orjson.loads(data)
            kind = frame["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            w.bad_frames += 1
            return
        if kind == "message":
            text = frame.get("text", "")
            if not text.startswith("LT:"):
                w.foreign += 1
                return
            _, s_idx, s_seq, s_ns, _ = text.split(":", 4)
            sender, seq = int(s_idx), int(s_seq)
            bm = self.recv.get(sender)
            if bm is None:
                bm = self.recv[sender] = bytearray(w.counts.get(sender, seq + 1))
            if seq >= len(bm):
                bm.extend(bytes(seq + 1 - len(bm)))
            if bm[seq]:
                self.dups += 1
            else:
                bm[seq] = 1
            w.delivered += 1
            b = (now - w.t0_ns) // w.bin_ns
            if 0 <= b < len(w.tl_delivered):
                w.tl_delivered[b] += 1
            if sender % w.nworkers == w.wid and self.stable and not self.slow:
                lat = (now - int(s_ns)) / 1e6
                if w.slow_at_ns and int(s_ns) >= w.slow_at_ns:
                    w.lat_slow.append(lat)
                else:
                    w.lat.append(lat)
                w.lat_bin.append(b if b >= 0 else 0)
                w.lat_of_bin.append(lat)
        elif kind == "ack":
            ref = frame.get("ref", "")
            acked = w.acked.get(self.idx)
            if acked is not None and ref.isdigit():
                seq = int(ref)
                if seq < len(acked):
                    acked[seq] = 1
                    w.acks += 1
        elif kind == "welcome" or kind == "joined":
            if kind == "joined":
                self.joined += 1
            waiter = self.waiter
            if (waiter is not None and not waiter.done()
                    and (kind == "welcome" or self.joined >= len(self.rooms))):
                waiter.set_result(None)
        elif kind != "error":
            w.other[kind] += 1
        else:
            code = str(frame.get("code", "?"))
            ref = str(frame.get("ref", ""))
            w.errors[code] += 1
            if ref.startswith("j") and self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(ConnectFailed(f"join: {code}"))

    def on_closed(self, client: Client) -> None:
        self.closed_code = client.close_code
        if self.waiter is not None and not self.waiter.done():
            reason = f"close {client.close_code}" if client.close_code else "connection lost"
            self.waiter.set_exception(ConnectFailed(reason))
        w = self.w
        if not w.closing:
            label = f"{client.close_code} {client.close_reason}".strip()
            (w.slow_closes if self.slow else w.closes)[label] += 1


class Worker:
    """Runs the connections ``i % nworkers == wid`` of ``plan``."""

    def __init__(self, plan: Plan, wid: int, urls: list[str], source_addrs: list[str],
                 secret: str, pipe: Pipe) -> None:
        self.plan = plan
        self.p = plan.params
        self.wid = wid
        self.nworkers = plan.workers
        self.target = Target(urls, source_addrs, plan.workers)
        self.secret = secret
        self.pipe = pipe
        self.counts = plan.counts
        self.conns = [
            Conn(self, c.idx, c.user, c.rooms, c.slow, True)
            for c in plan.conns if c.idx % plan.workers == wid
        ]
        self.by_idx = {c.idx: c for c in self.conns}
        self.senders = [s for s in plan.senders if s.idx % plan.workers == wid]
        self.churn = [c for c in plan.churn if c.slot % plan.workers == wid]
        self.acked: dict[int, bytearray] = {s.idx: bytearray(s.count) for s in self.senders}
        self.sent = 0
        self.acks = 0
        self.delivered = 0
        #: every text frame received, of any type (the coordinator waits for it to settle).
        self.frames = 0
        self.bad_frames = 0
        self.foreign = 0
        self.errors: Counter[str] = Counter()
        #: frames other than message/ack/welcome/joined/error, by type (presence, pong, ...).
        self.other: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.slow_closes: Counter[str] = Counter()
        self.connect_fail: Counter[str] = Counter()
        self.connect_lat: array[float] = array("f")
        self.connected = 0
        #: wall-clock start of the arrival schedule and monotonic time of the last success.
        self.connect_start = 0.0
        self.last_connect = 0.0
        self.churn_fail: Counter[str] = Counter()
        self.churn_lat: array[float] = array("f")
        self.churn_conns: list[Conn] = []
        self.churn_cycles = 0
        self.lat: array[float] = array("f")
        self.lat_slow: array[float] = array("f")
        self.lat_bin: array[int] = array("I")
        self.lat_of_bin: array[float] = array("f")
        self.send_lag: array[float] = array("f")
        self.bin_ns = int(BIN * 1e9)
        self.t0_ns = 0
        self.slow_at_ns = 0
        nbins = int((self.p.duration + self.p.drain + 5) / BIN) + 1
        self.tl_delivered = array("I", bytes(4 * nbins))
        self.tl_sent = array("I", bytes(4 * nbins))
        self.closing = False
        #: set once the worker only waits for the final "close" (which then must not cancel).
        self.finishing = False
        self.main_task: asyncio.Task[None] | None = None
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    # -- coordinator link -------------------------------------------------------------------

    def post(self, *msg: Any) -> None:
        self.pipe.send(msg)

    def _read_pipe(self, loop: asyncio.AbstractEventLoop) -> None:
        """Thread: block on the pipe, hand each command to the loop.

        A thread rather than ``loop.add_reader``: uvloop makes a watched fd non-blocking, and
        this duplex pipe is also where large results are written.
        """
        while True:
            try:
                msg = self.pipe.recv()
            except (EOFError, OSError):
                msg = ("close",)
            loop.call_soon_threadsafe(self.inbox.put_nowait, msg)
            if msg[0] == "close":
                # The coordinator gave up (or was interrupted): stop whatever phase is running.
                if not self.finishing and self.main_task is not None:
                    loop.call_soon_threadsafe(self.main_task.cancel)
                return

    async def expect(self, kind: str) -> tuple[Any, ...]:
        msg = await self.inbox.get()
        if msg[0] == "close" and kind != "close":
            raise asyncio.CancelledError("coordinator went away")
        if msg[0] != kind:
            raise RuntimeError(f"worker {self.wid}: expected {kind!r}, got {msg[0]!r}")
        return msg

    def progress(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "failed": sum(self.connect_fail.values()),
            "sent": self.sent,
            "delivered": self.delivered,
            "frames": self.frames,
            "churn": self.churn_cycles,
        }

    async def progress_loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            self.post("progress", self.wid, self.progress())

    # -- connecting -----------------------------------------------------------------------

    async def open(self, c: Conn, intended: float, lat: array[float],
                   fail: Counter[str], rcvbuf: int | None = None, stable: bool = True) -> bool:
        """Connect, authenticate and join ``c``'s rooms; latency is counted from ``intended``."""
        loop = asyncio.get_running_loop()
        delay = intended - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        p = self.p
        url, family, addr, src = self.target.pick(c.idx)
        token = mint(self.secret, c.user, p.ttl) if p.auth != "login" else ""
        if p.auth == "query":
            url = f"{url}{'&' if '?' in url else '?'}token={token}"
        try:
            async with asyncio.timeout(intended + p.connect_timeout - time.monotonic()):
                c.waiter = loop.create_future()
                client = await open_client(url, addr, c.on_text, local_host=src, rcvbuf=rcvbuf,
                                           family=family)
                c.client = client
                client.closed.add_done_callback(lambda _f: c.on_closed(client))
                if p.auth == "frame":
                    client.send(orjson.dumps({"type": "auth", "token": token}))
                elif p.auth == "login":
                    client.send(orjson.dumps(
                        {"type": "login", "username": c.user, "password": p.password}))
                await c.waiter
                if c.rooms:
                    c.waiter = loop.create_future()
                    for k, room in enumerate(c.rooms):
                        client.send(orjson.dumps({"type": "join", "room": room, "ref": f"j{k}"}))
                    await c.waiter
        except (ConnectFailed, OSError, TimeoutError) as exc:
            fail[failure_reason(exc)] += 1
            if c.client is not None:
                c.client.close()
            c.client = None
            return False
        finally:
            c.waiter = None
        done = time.monotonic()
        lat.append((done - intended) * 1000.0)
        if stable:
            self.last_connect = max(self.last_connect, done)
        return True

    async def connect_all(self, start_wall: float) -> None:
        """Open this worker's connections on the plan's arrival schedule (shared by all workers)."""
        start = time.monotonic() + (start_wall - time.time())
        self.connect_start = start
        rate = self.p.connect_rate if self.p.connect_rate > 0 else float("inf")

        async def one(c: Conn) -> None:
            rcvbuf = SLOW_RCVBUF if c.slow else None
            if await self.open(c, start + c.idx / rate, self.connect_lat, self.connect_fail,
                               rcvbuf):
                self.connected += 1

        await asyncio.gather(*(one(c) for c in self.conns))

    # -- the measured phase -----------------------------------------------------------------

    def _text(self, s: SenderSpec, seq: int, intended_ns: int) -> str:
        head = f"LT:{s.idx}:{seq}:{intended_ns}:"
        return head + "x" * max(0, self.p.size - len(head))

    async def send_loop(self, t0: float) -> None:
        """Send every scheduled message at (or, when late, right after) its intended time."""
        heap: list[tuple[float, int, int]] = [
            (t0 + s.offset, k, 0) for k, s in enumerate(self.senders) if s.count > 0
        ]
        heapq.heapify(heap)
        dumps = orjson.dumps
        while heap:
            delay = heap[0][0] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                t, k, seq = heap[0]
                s = self.senders[k]
                intended_ns = int(t * 1e9)
                c = self.by_idx[s.idx]
                if c.client is not None and c.client.is_open:
                    text = self._text(s, seq, intended_ns)
                    if s.to is None:
                        frame = {"type": "send", "room": s.room, "text": text, "ref": str(seq)}
                    else:
                        frame = {"type": "send", "to": s.to, "text": text, "ref": str(seq)}
                    c.client.send(dumps(frame))
                    self.sent += 1
                    self.send_lag.append((now - t) * 1000.0)
                    b = int((t - t0) / BIN)
                    if 0 <= b < len(self.tl_sent):
                        self.tl_sent[b] += 1
                if seq + 1 < s.count:
                    heapq.heapreplace(heap, (t + s.interval, k, seq + 1))
                else:
                    heapq.heappop(heap)

    async def churn_loop(self, spec: ChurnSpec, t0: float, end: float) -> None:
        """Connect, stay ``churn_life``, leave; again until ``end``. Arrivals are staggered."""
        life = max(0.05, self.p.churn_life)
        intended = t0 + (spec.slot / max(1, len(self.plan.churn))) * life
        n = 0
        while intended < end:
            c = Conn(self, -1 - spec.slot, spec.user, (spec.room,), False, False)
            self.churn_conns.append(c)
            ok = await self.open(c, intended, self.churn_lat, self.churn_fail, stable=False)
            self.churn_cycles += 1
            n += 1
            if ok:
                await asyncio.sleep(max(0.0, intended + life - time.monotonic()))
                if c.client is not None:
                    c.client.close()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5):
                            await c.client.closed
            intended += life

    async def measured_phase(self, go_wall: float) -> None:
        t0 = time.monotonic() + (go_wall - time.time())
        self.t0_ns = int(t0 * 1e9)
        p = self.p
        if self.plan.slow_at is not None:
            self.slow_at_ns = self.t0_ns + int(self.plan.slow_at * 1e9)
        end = t0 + p.duration
        tasks = [asyncio.create_task(self.send_loop(t0))]
        tasks += [asyncio.create_task(self.churn_loop(s, t0, end)) for s in self.churn]
        if self.plan.slow_at is not None:
            tasks.append(asyncio.create_task(self.slow_loop(t0 + self.plan.slow_at, end)))
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        await asyncio.gather(*tasks)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        # Wait (bounded) for the acks of what this worker sent.
        deadline = time.monotonic() + p.drain
        while self.acks + sum(self.errors.values()) < self.sent and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def slow_loop(self, at: float, end: float) -> None:
        """Slow consumers stop reading at ``at`` and resume at ``end`` (to read their close)."""
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        slow = [c for c in self.conns if c.slow and c.client is not None]
        for c in slow:
            assert c.client is not None
            c.client.pause_reading()
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        for c in slow:
            assert c.client is not None
            c.client.resume_reading()
        # Reading again, each drains its backlog and then finds the server's close frame (4002)
        # if the server did close it; give that a bounded moment to finish.
        pending = [c.client.closed for c in slow if c.client is not None]
        if pending:
            await asyncio.wait(pending, timeout=min(5.0, self.p.drain))

    # -- results --------------------------------------------------------------------------

    def count_losses(self, acked: dict[int, bytes]) -> dict[str, int]:
        """Lost = acknowledged messages a (stable, fast, connected) receiver never got."""
        lost = expected = received = unexpected = 0
        plan = self.plan
        for c in self.conns:
            if c.client is None or c.slow:
                continue
            should: list[int] = []
            for room in c.rooms:
                should.extend(plan.room_senders.get(room, ()))
            should.extend(plan.dm_senders.get(c.idx, ()))
            for sender in should:
                a = acked.get(sender)
                if a is None:
                    continue
                got = c.recv.get(sender, b"")
                n_acked = a.count(1)
                expected += n_acked
                ai = int.from_bytes(a, "little")
                gi = int.from_bytes(got.ljust(len(a), b"\0")[: len(a)], "little")
                # bytes are 0/1, so popcount(a & ~got) counts acked-but-missing messages.
                missing = (ai & ~gi).bit_count()
                lost += missing
                received += n_acked - missing
            for sender, got in c.recv.items():
                a = acked.get(sender, b"")
                gi = int.from_bytes(got, "little")
                ai = int.from_bytes(bytes(a).ljust(len(got), b"\0")[: len(got)], "little")
                unexpected += (gi & ~ai).bit_count() if sender in should else got.count(1)
        return {"expected": expected, "received": received, "lost": lost,
                "unexpected": unexpected}

    def result(self, losses: dict[str, int], cpu: float, wall: float) -> dict[str, Any]:
        dups = sum(c.dups for c in self.conns) + sum(c.dups for c in self.churn_conns)
        return {
            "wid": self.wid,
            "pid": os.getpid(),
            "connections": len(self.conns),
            "connected": self.connected,
            "connect_fail": dict(self.connect_fail),
            "connect_lat": self.connect_lat.tobytes(),
            "connect_span": max(0.0, self.last_connect - self.connect_start),
            "churn_cycles": self.churn_cycles,
            "churn_fail": dict(self.churn_fail),
            "churn_lat": self.churn_lat.tobytes(),
            "sent": self.sent,
            "acked": self.acks,
            "errors": dict(self.errors),
            "delivered": self.delivered,
            "duplicated": dups,
            **losses,
            "bad_frames": self.bad_frames,
            "foreign": self.foreign,
            "other_frames": dict(self.other),
            "closes": dict(self.closes),
            "slow_closes": dict(self.slow_closes),
            "slow": sum(1 for c in self.conns if c.slow),
            "lat": self.lat.tobytes(),
            "lat_slow": self.lat_slow.tobytes(),
            "lat_bin": self.lat_bin.tobytes(),
            "lat_of_bin": self.lat_of_bin.tobytes(),
            "send_lag": self.send_lag.tobytes(),
            "tl_sent": self.tl_sent.tobytes(),
            "tl_delivered": self.tl_delivered.tobytes(),
            "cpu": cpu,
            "wall": wall,
        }

    # -- the exchange with the coordinator ------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.main_task = asyncio.current_task()
        threading.Thread(target=self._read_pipe, args=(loop,), daemon=True).start()
        ticker = asyncio.create_task(self.progress_loop())
        try:
            self.post("hello", self.wid, os.getpid())
            (_, start_wall) = await self.expect("connect")
            cpu0 = cpu_seconds()
            await self.connect_all(start_wall)
            # The connections' objects live until the end: out of the cycle collector's sight,
            # a full collection no longer scans them (80-100 ms with 2,500 connections, which
            # the run would have charged to the server as latency).
            gc.freeze()
            self.post("ready", self.wid, self.progress(), cpu_seconds() - cpu0)
            (_, go_wall) = await self.expect("go")
            cpu1, wall1 = cpu_seconds(), time.monotonic()
            await self.measured_phase(go_wall)
            cpu = cpu_seconds() - cpu1
            self.post("sent", self.wid, self.progress())
            await self.expect("collect")
            wall = time.monotonic() - wall1
            self.post("acked", self.wid, {k: bytes(v) for k, v in self.acked.items()})
            (_, acked) = await self.expect("acked")
            self.finishing = True
            self.post("result", self.wid, self.result(self.count_losses(acked), cpu, wall))
            await self.expect("close")
        finally:
            ticker.cancel()
            self.closing = True
            await self.close_all()

    async def close_all(self) -> None:
        clients = [c.client for c in [*self.conns, *self.churn_conns] if c.client is not None]
        for client in clients:
            client.close()
        pending = [c.closed for c in clients if not c.closed.done()]
        if pending:
            await asyncio.wait(pending, timeout=3)


def main(plan: Plan, wid: int, urls: list[str], source_addrs: list[str], secret: str,
         pipe: Pipe) -> None:
    """Process entry point (multiprocessing target)."""
    raise_nofile()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a chatd dependency
        runner = asyncio.run
    else:
        runner = uvloop.run

    async def go() -> None:
        await Worker(plan, wid, urls, source_addrs, secret, pipe).run()

    try:
        runner(go())
    except (asyncio.CancelledError, KeyboardInterrupt):
        pass
    except BaseException as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", wid, f"{type(exc).__name__}: {exc}"))
        raise


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns ``(soft, hard)`` after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard
