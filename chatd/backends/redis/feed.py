"""The feed of a Redis node: one dedicated pub/sub connection, its channels and its liveness.

Never a pattern subscription. Channels are reference-counted and unsubscribed ``linger`` seconds
after the count drops to zero (cancelled by a new subscriber: clients rejoin often), and
:meth:`RedisFeed.subscribe` returns only once Redis confirmed the SUBSCRIBE, so frames published
after it returns reach the handler (the server reads history after subscribing).

Liveness: a probe is published to a node-private channel every ``probe_interval``. A probe Redis
accepted but the feed never delivered, or one with no receiver at all, means the connection is
dead in a way TCP did not report, and it is restarted. After any interruption the feed reconnects
with exponential backoff and jitter, resubscribes every channel in batches, then calls
:meth:`~chatd.backends.base.FeedHandler.feed_lost` because frames published in the gap were not
received.

Payloads are parsed without decoding JSON (see :mod:`chatd.backends.redis.broker`): the handler
gets the frame bytes as published.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import Counter, deque
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatd.backends.base import CloseMatching, FeedHandler, RoomChange, RoomChangeHandler
from chatd.backends.redis.client import Keys, stop, unavailable
from chatd.errors import BackendUnavailable

log = logging.getLogger("chatd.redis")

#: Seconds a channel stays subscribed after its last reference is dropped.
LINGER = 5.0
#: Channels per SUBSCRIBE command when resubscribing after a reconnect.
RESUBSCRIBE_BATCH = 500
#: Reconnect backoff: first delay, cap (each attempt doubles, with jitter).
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0

ROOM, USER = 0, 1


class _Sub:
    """One channel of the feed: its references, and whether Redis confirmed the SUBSCRIBE."""

    __slots__ = ("confirmed", "kind", "linger", "name", "refs", "requested", "waiters")

    def __init__(self, kind: int, name: str) -> None:
        self.kind = kind
        self.name = name
        self.refs = 0
        self.requested = False  # a SUBSCRIBE was sent on the current connection
        self.confirmed = False  # ... and Redis answered it
        self.waiters: list[asyncio.Future[None]] = []
        self.linger: asyncio.TimerHandle | None = None

    def settle(self, exc: BaseException | None = None) -> None:
        for fut in self.waiters:
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)
        self.waiters.clear()


class RedisFeed:
    """The node's pub/sub connection and what it is subscribed to.

    Args:
        client: the command client (publishes the probes).
        pubsub_pool: makes the feed connection (``client.create_pubsub_pool``).
        keys: channel names.
        instance: this node's unique name (its probe channel).
        command_timeout: bound of a connect, a (re)subscription, a probe.
        probe_interval: seconds between probes.
        linger: seconds a channel stays subscribed after its last reference is dropped.
    """

    def __init__(self, client: aioredis.Redis, pubsub_pool: aioredis.ConnectionPool, keys: Keys,
                 *, instance: str, command_timeout: float, probe_interval: float,
                 linger: float = LINGER) -> None:
        self._client = client
        self._pool = pubsub_pool
        self._keys = keys
        self._timeout = command_timeout
        self._probe_interval = max(probe_interval, 0.01)
        self._stale_after = command_timeout + self._probe_interval
        self._linger = linger
        self._probe_channel = keys.probe(instance)
        self._handler: FeedHandler | None = None
        self._subs: dict[bytes, _Sub] = {}
        self._conn: Any = None  # the feed connection while connected
        self._up = False
        self._up_event = asyncio.Event()
        self._inflight: Counter[bytes] = Counter()  # (UN)SUBSCRIBE replies still expected
        self._batch: set[bytes] | None = None
        self._batch_done: asyncio.Future[None] | None = None
        self._lost = False
        self._lost_rooms: set[str] = set()
        self._unsub_queue: set[bytes] = set()
        self._commands_ok = False
        self._probed = asyncio.Event()  # a probe went through since start
        self._probe_seq = 0
        self._probes: deque[tuple[int, float]] = deque()  # published, not yet seen on the feed
        self._tasks: list[asyncio.Task[None]] = []
        self._read_task: asyncio.Task[None] | None = None
        self._closing = False
        #: Times the feed came back after being lost (for tests and metrics).
        self.restarts = 0

    async def start(self, handler: FeedHandler) -> None:
        """Start the connection and the probe; waits up to ``command_timeout`` for both."""
        self._handler = handler
        self._closing = False
        self._tasks = [asyncio.create_task(self._feed_loop(), name="chatd-redis-feed"),
                       asyncio.create_task(self._probe_loop(), name="chatd-redis-probe")]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                await self._up_event.wait()
                await self._probed.wait()

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            await stop(task)
        self._tasks = []
        for sub in self._subs.values():
            if sub.linger is not None:
                sub.linger.cancel()
            sub.settle(BackendUnavailable())
        self._subs.clear()
        self._handler = None
        with contextlib.suppress(Exception):
            await self._pool.aclose()

    def healthy(self) -> bool:
        """Connected, subscribed, probes go through and come back."""
        return self._up and self._commands_ok and not self._stale(time.monotonic())

    def _stale(self, now: float) -> bool:
        return bool(self._probes) and now - self._probes[0][1] > self._stale_after

    # -- subscriptions -----------------------------------------------------------------------

    async def subscribe(self, channel: bytes, kind: int, name: str) -> None:
        """Take one reference on ``channel``; returns once Redis confirmed the subscription."""
        sub = self._subs.get(channel)
        if sub is None:
            if not self._up:
                raise BackendUnavailable()
            sub = self._subs[channel] = _Sub(kind, name)
        sub.refs += 1
        if sub.linger is not None:
            sub.linger.cancel()
            sub.linger = None
        if sub.confirmed:
            return
        try:
            conn = self._conn
            if not self._up or conn is None:
                raise BackendUnavailable()
            fut = asyncio.get_running_loop().create_future()
            sub.waiters.append(fut)
            if not sub.requested:
                sub.requested = True
                self._inflight[channel] += 1
                await self._send(conn, b"SUBSCRIBE", channel)
            async with asyncio.timeout(self._timeout):
                await fut
        except TimeoutError:
            self.release(channel)
            raise BackendUnavailable() from None
        except BaseException:
            self.release(channel)
            raise

    def release(self, channel: bytes) -> None:
        """Drop one reference; the channel is unsubscribed ``linger`` seconds after the last."""
        sub = self._subs.get(channel)
        if sub is None or sub.refs <= 0:
            return
        sub.refs -= 1
        if sub.refs == 0:
            if self._linger <= 0:
                self._expire(channel)
            else:
                sub.linger = asyncio.get_running_loop().call_later(self._linger, self._expire,
                                                                   channel)

    def _expire(self, channel: bytes) -> None:
        sub = self._subs.get(channel)
        if sub is None or sub.refs > 0:
            return
        del self._subs[channel]
        sub.settle(BackendUnavailable())
        if self._conn is not None:
            if not self._unsub_queue:
                asyncio.get_running_loop().call_soon(self._flush_unsubscribes)
            self._unsub_queue.add(channel)

    def _flush_unsubscribes(self) -> None:
        channels = [c for c in self._unsub_queue if c not in self._subs]
        self._unsub_queue.clear()
        conn = self._conn
        if not channels or conn is None:
            return
        for c in channels:
            self._inflight[c] += 1
        task = asyncio.create_task(self._send(conn, b"UNSUBSCRIBE", *channels))
        task.add_done_callback(_ignore_result)

    async def _send(self, conn: Any, *args: bytes) -> None:
        """Write one command on the feed connection (its replies arrive on the feed)."""
        if self._conn is not conn:  # checked before the first await: no silent reconnect
            raise BackendUnavailable()
        with unavailable("subscribe"):
            async with asyncio.timeout(self._timeout):
                await conn.send_command(*args, check_health=False)

    # -- the connection ----------------------------------------------------------------------

    async def _feed_loop(self) -> None:
        delay = BACKOFF_MIN
        while not self._closing:
            conn: Any = None
            read: asyncio.Task[None] | None = None
            try:
                conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
                with unavailable("feed connect"):
                    async with asyncio.timeout(self._timeout):
                        await conn.connect()
                self._conn = conn
                self._inflight.clear()
                read = self._read_task = asyncio.create_task(self._read(conn))
                await self._resubscribe(conn, read)
                self._went_up()
                delay = BACKOFF_MIN
                await asyncio.wait({read})
                if not read.cancelled() and read.exception() is not None:
                    log.warning("redis feed interrupted: %r", read.exception())
            except BackendUnavailable as exc:
                log.debug("redis feed not connected: %r", exc.__cause__ or exc)
            except Exception:
                log.exception("redis feed failed")
            finally:
                await stop(read)
                self._went_down(conn)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
            if not self._closing:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX)

    async def _resubscribe(self, conn: Any, read: asyncio.Task[None]) -> None:
        """Subscribe the control and probe channels and every referenced one, in batches."""
        base = {self._keys.control, self._keys.room_control, self._probe_channel}
        channels = [*base, *self._subs]
        loop = asyncio.get_running_loop()
        for i in range(0, len(channels), RESUBSCRIBE_BATCH):
            # A channel whose linger ran out meanwhile is not subscribed again.
            batch = [c for c in channels[i:i + RESUBSCRIBE_BATCH] if c in base or c in self._subs]
            if not batch:
                continue
            self._batch = set(batch)
            done = self._batch_done = loop.create_future()
            for c in batch:
                self._inflight[c] += 1
                sub = self._subs.get(c)
                if sub is not None:
                    sub.requested = True
            await self._send(conn, b"SUBSCRIBE", *batch)
            try:
                async with asyncio.timeout(self._timeout):
                    await asyncio.wait({done, read}, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                raise BackendUnavailable("resubscribe timed out") from None
            if not done.done():  # the reader failed first
                raise BackendUnavailable("feed closed while resubscribing")
        self._batch = self._batch_done = None

    def _went_up(self) -> None:
        self._up = True
        self._up_event.set()
        self._probes.clear()
        log.info("redis feed up (%d channels)", len(self._subs))
        if self._lost:
            rooms = frozenset(self._lost_rooms)
            self._lost = False
            self._lost_rooms.clear()
            self.restarts += 1
            if self._handler is not None:
                try:
                    self._handler.feed_lost(rooms)
                except Exception:
                    log.exception("feed_lost handler failed")

    def _went_down(self, conn: Any) -> None:
        if self._conn is conn:
            self._conn = None
        self._read_task = None
        if self._up:
            log.warning("redis feed down")
            # Redis may have restarted: drop idle pooled connections now rather than have
            # each fail one command later.
            task = asyncio.get_running_loop().create_task(
                self._client.connection_pool.disconnect(inuse_connections=False))
            task.add_done_callback(_ignore_result)
            self._lost = True
            self._lost_rooms.update(s.name for s in self._subs.values()
                                    if s.kind == ROOM and s.refs > 0)
        self._up = False
        self._up_event.clear()
        self._inflight.clear()
        self._unsub_queue.clear()
        if self._batch_done is not None and not self._batch_done.done():
            self._batch_done.cancel()
        self._batch = self._batch_done = None
        for sub in self._subs.values():
            sub.confirmed = sub.requested = False
            sub.settle(BackendUnavailable())

    async def _read(self, conn: Any) -> None:
        """Read the feed until the connection fails (no timeout: quiet channels are normal)."""
        while True:
            reply = await conn.read_response()
            try:
                self._on_reply(reply)
            except Exception:
                log.exception("dropping a malformed feed reply")

    def _on_reply(self, reply: list[Any]) -> None:
        kind = reply[0]
        channel = reply[1]
        if kind == b"message":
            self._on_message(channel, reply[2])
        elif kind == b"subscribe":
            if self._inflight[channel] > 0:
                self._inflight[channel] -= 1
            if self._inflight[channel] == 0:
                del self._inflight[channel]
                sub = self._subs.get(channel)
                if sub is not None:
                    sub.confirmed = True
                    sub.settle()
            if self._batch is not None:
                self._batch.discard(channel)
                done = self._batch_done
                if not self._batch and done is not None and not done.done():
                    done.set_result(None)
        elif kind == b"unsubscribe" and self._inflight[channel] > 0:
            self._inflight[channel] -= 1
            if self._inflight[channel] == 0:
                del self._inflight[channel]

    def _on_message(self, channel: bytes, data: bytes) -> None:
        handler = self._handler
        sub = self._subs.get(channel)
        if sub is not None:
            if handler is None or self._lost:
                # Until feed_lost is reported, frames on a new connection are withheld: a client
                # that saw one would resume after it and skip the gap before it.
                return
            if sub.kind == ROOM:
                sp = data.index(b" ")
                msg_id = data[:sp]
                handler.room_frame(sub.name, None if msg_id == b"-" else msg_id.decode(),
                                   data[sp + 1:])
            else:
                msg_id, size, rest = data.split(b" ", 2)
                n = int(size)
                handler.user_frame(sub.name, msg_id.decode(), rest[n:], rest[:n].decode())
        elif channel == self._probe_channel:
            seq = int(data)
            probes = self._probes
            while probes and probes[0][0] <= seq:
                probes.popleft()
        elif channel == self._keys.control and handler is not None:
            handler.control(_decode_control(data))
        elif channel == self._keys.room_control and isinstance(handler, RoomChangeHandler):
            change = _decode_room_change(data)
            if change is not None:
                handler.room_change(change)

    # -- liveness ----------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        """Publish a probe to ourselves; restart the feed when Redis took it but we never got it."""
        while not self._closing:
            self._probe_seq += 1
            seq = self._probe_seq
            try:
                with unavailable("probe"):
                    async with asyncio.timeout(self._timeout):
                        receivers = await self._client.publish(self._probe_channel, str(seq))
                self._commands_ok = True
                self._probed.set()
                if self._up:
                    if receivers == 0:
                        # Redis does not know our subscription (it restarted behind a
                        # connection we still believe in).
                        self._restart_feed("probe had no receiver")
                    else:
                        self._probes.append((seq, time.monotonic()))
            except BackendUnavailable:
                self._commands_ok = False
            except Exception:
                self._commands_ok = False
                log.exception("redis probe failed")
            if self._up and self._stale(time.monotonic()):
                self._restart_feed("probe not received")
            await asyncio.sleep(self._probe_interval)

    def _restart_feed(self, why: str) -> None:
        if self._read_task is not None and not self._read_task.done():
            log.warning("restarting the redis feed: %s", why)
            self._read_task.cancel()


_CONTROL_FIELDS = frozenset(f.name for f in dataclasses.fields(CloseMatching))


def _decode_control(data: bytes) -> CloseMatching:
    # Unknown fields are dropped so that nodes of different versions can share a cluster.
    obj = orjson.loads(data)
    return CloseMatching(**{k: v for k, v in obj.items() if k in _CONTROL_FIELDS})


def _decode_room_change(data: bytes) -> RoomChange | None:
    """A room change, or None (logged) for a payload no chatd node published."""
    try:
        obj = orjson.loads(data)
        room, user, reason = obj["room"], obj["user"], obj.get("reason", "")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        obj = None
    if obj is None or not all(isinstance(v, str) for v in (room, user, reason)):
        log.warning("ignored a malformed room change on the control channel")
        return None
    return RoomChange(room=room, user=user, reason=reason)


def _ignore_result(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        exc = task.exception()
        if exc is not None and not isinstance(exc, BackendUnavailable | RedisError):
            log.warning("unsubscribe failed: %r", exc)
