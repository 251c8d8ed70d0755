"""The Redis broker: history in streams, fan-out over pub/sub.

Publishing is one ``EVALSHA`` of a Lua script that assigns the stream id, splices it into the
pre-encoded frame (:func:`chatd.protocol.message_template`, no cjson), appends the frame to the
stream (``XADD MAXLEN ~``), refreshes the stream's TTL and publishes it to the channel(s). Redis
runs scripts atomically, so the append order is the publish order and every node sees the same
ids in the same order; ids are stream ids, ``<ms>-<seq>`` from the Redis clock.

Channel payloads (a node forwards the frame bytes without decoding them):

- room channel: ``<id> <frame>`` for a message, ``- <frame>`` for a frame that is not retained
  (presence);
- user channel: ``<id> <n> <origin><frame>``, ``origin`` being the sending connection and ``n``
  its length in bytes (a node id may contain anything);
- control channel: the JSON of a :class:`~chatd.backends.base.CloseMatching`;
- probe channel: a sequence number.

Receiving is :class:`~chatd.backends.redis.feed.RedisFeed`'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import orjson
import redis.asyncio as aioredis

from chatd import protocol
from chatd.backends.base import (
    Broker,
    CloseMatching,
    FeedHandler,
    RoomChange,
    StoredMessage,
    dm_stream,
    room_stream,
)
from chatd.backends.redis.client import Keys, call, unavailable
from chatd.backends.redis.feed import LINGER, ROOM, USER, RedisFeed
from chatd.ids import id_key

# Shared by both publish scripts: the next id of stream KEYS[1], strictly above its last entry.
# Lua numbers are doubles: millisecond timestamps (13 digits) are exact.
_NEXT_ID = """
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = 0
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  local lms, lseq = string.match(last[1], '^(%d+)%-(%d+)$')
  lms = tonumber(lms)
  if ms <= lms then
    ms = lms
    seq = tonumber(lseq) + 1
  end
end
local mss = string.format('%.0f', ms)
local id = mss .. '-' .. string.format('%.0f', seq)
local frame = ARGV[1] .. id .. ARGV[2] .. mss .. '}'
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], id, 'f', frame)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
"""

# KEYS[1] stream; ARGV: head, mid, maxlen, ttl ms, channel.
PUBLISH_ROOM = _NEXT_ID + """
redis.call('PUBLISH', ARGV[5], id .. ' ' .. frame)
return id
"""

# KEYS[1] stream; ARGV: head, mid, maxlen, ttl ms, "<n> <origin>", channels...
PUBLISH_DIRECT = _NEXT_ID + """
local payload = id .. ' ' .. ARGV[5] .. frame
for i = 6, #ARGV do
  redis.call('PUBLISH', ARGV[i], payload)
end
return id
"""


class RedisBroker(Broker):
    """:class:`~chatd.backends.base.Broker` over Redis streams and pub/sub.

    Args:
        client: the command client (shared with presence and state).
        pubsub_pool: makes the dedicated feed connection.
        keys: key and channel names.
        instance: this node's unique name (node id plus a random suffix).
        command_timeout: bound of every command, and of a (re)subscription.
        probe_interval: seconds between liveness probes of the feed.
        max_per_stream: ``history.max_per_room`` (approximate trimming, ``MAXLEN ~``).
        history_ttl: seconds an idle stream is kept.
        linger: seconds a channel stays subscribed after its last reference is dropped.
    """

    def __init__(self, client: aioredis.Redis, pubsub_pool: aioredis.ConnectionPool, keys: Keys,
                 *, instance: str, command_timeout: float, probe_interval: float,
                 max_per_stream: int, history_ttl: float, linger: float = LINGER) -> None:
        self._client = client
        self._keys = keys
        self._timeout = command_timeout
        self._maxlen = max_per_stream
        self._ttl_ms = max(1, int(history_ttl * 1000))
        self._publish_room = client.register_script(PUBLISH_ROOM)
        self._publish_direct = client.register_script(PUBLISH_DIRECT)
        self.feed = RedisFeed(client, pubsub_pool, keys, instance=instance,
                              command_timeout=command_timeout, probe_interval=probe_interval,
                              linger=linger)
        self.companions: list[Any] = []  # started and closed with the broker (presence)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, handler: FeedHandler) -> None:
        """Start the feed and the probe; waits up to ``command_timeout`` for the feed.

        Never fails: with Redis down the node starts not ready and becomes ready when Redis
        answers.
        """
        for companion in self.companions:
            companion.start()
        await self.feed.start(handler)

    async def close(self) -> None:
        """Stop the presence heartbeat (entries expire by TTL), the feed, and the client."""
        for companion in self.companions:
            await companion.close()
        await self.feed.close()
        with contextlib.suppress(Exception):
            await self._client.aclose()

    def healthy(self) -> bool:
        return self.feed.healthy()

    # -- subscriptions -----------------------------------------------------------------------

    async def subscribe_room(self, room: str) -> None:
        await self.feed.subscribe(self._keys.room_channel(room), ROOM, room)

    def release_room(self, room: str) -> None:
        self.feed.release(self._keys.room_channel(room))

    async def subscribe_user(self, user: str) -> None:
        await self.feed.subscribe(self._keys.user_channel(user), USER, user)

    def release_user(self, user: str) -> None:
        self.feed.release(self._keys.user_channel(user))

    # -- publishing --------------------------------------------------------------------------

    async def publish_room(self, room: str, sender: str, text: str) -> StoredMessage:
        head, mid = protocol.message_template(sender=sender, text=text, room=room)
        with unavailable("publish"):
            async with asyncio.timeout(self._timeout):
                raw = await self._publish_room(
                    keys=[self._keys.stream(room_stream(room))],
                    args=[head, mid, self._maxlen, self._ttl_ms, self._keys.room_channel(room)])
        msg_id = raw.decode()
        return StoredMessage(msg_id, protocol.message_frame(head, mid, msg_id))

    async def publish_direct(self, sender: str, to: str, text: str, origin: str) -> StoredMessage:
        head, mid = protocol.message_template(sender=sender, text=text, to=to)
        raw_origin = origin.encode()
        channels = [self._keys.user_channel(u) for u in dict.fromkeys((to, sender))]
        with unavailable("publish"):
            async with asyncio.timeout(self._timeout):
                raw = await self._publish_direct(
                    keys=[self._keys.stream(dm_stream(sender, to))],
                    args=[head, mid, self._maxlen, self._ttl_ms,
                          b"%d %s" % (len(raw_origin), raw_origin), *channels])
        msg_id = raw.decode()
        return StoredMessage(msg_id, protocol.message_frame(head, mid, msg_id))

    async def publish_room_frame(self, room: str, frame: bytes) -> None:
        with unavailable("publish"):
            async with asyncio.timeout(self._timeout):
                await self._client.publish(self._keys.room_channel(room), b"- " + frame)

    async def publish_control(self, event: CloseMatching) -> None:
        data = orjson.dumps(dataclasses.asdict(event))
        with unavailable("publish"):
            async with asyncio.timeout(self._timeout):
                await self._client.publish(self._keys.control, data)

    async def publish_room_change(self, change: RoomChange) -> None:
        data = orjson.dumps(dataclasses.asdict(change))
        with unavailable("publish"):
            async with asyncio.timeout(self._timeout):
                await self._client.publish(self._keys.room_control, data)

    # -- history -----------------------------------------------------------------------------

    async def recent(self, stream: str, limit: int) -> list[StoredMessage]:
        if limit <= 0:
            return []
        entries: Any = await call("history", self._timeout, lambda: self._client.xrevrange(
            self._keys.stream(stream), count=limit), idempotent=True)
        return _messages(reversed(entries))

    async def history(self, stream: str, *, before: str | None, since: str | None,
                      limit: int) -> list[StoredMessage]:
        if limit <= 0:
            return []
        if before is not None and (id_key(before) <= (0, 0)
                                   or (since is not None and id_key(since) >= id_key(before))):
            return []
        key = self._keys.stream(stream)
        entries: Any
        if since is not None and before is None:
            entries = await call("history", self._timeout, lambda: self._client.xrange(
                key, "(" + since, "+", count=limit), idempotent=True)
            return _messages(entries)
        hi = "(" + before if before is not None else "+"
        lo = "(" + since if since is not None else "-"
        entries = await call("history", self._timeout, lambda: self._client.xrevrange(
            key, hi, lo, count=limit), idempotent=True)
        return _messages(reversed(entries))

    async def replay(self, stream: str, since: str, limit: int) -> tuple[list[StoredMessage], bool]:
        """Messages after ``since``; recovered only when ``since`` lies in the retained range.

        The three reads run in one MULTI/EXEC, so no trim or append slips between them. A stream
        lost with a Redis restart (no persistence) is empty or starts after ``since``: not
        recovered.
        """
        key = self._keys.stream(stream)

        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.xrange(key, "(" + since, "+", count=limit + 1)
                pipe.xrange(key, "-", "+", count=1)
                pipe.xrevrange(key, "+", "-", count=1)
                return await pipe.execute()

        after, first, last = await call("history", self._timeout, read, idempotent=True)
        messages = _messages(after[:limit])
        since_key = id_key(since)
        within = bool(first) and (id_key(first[0][0].decode()) <= since_key
                                  <= id_key(last[0][0].decode()))
        return messages, within and len(after) <= limit


def _messages(entries: Any) -> list[StoredMessage]:
    """Stream entries (``[(id, {b"f": frame}), ...]``) as stored messages."""
    return [StoredMessage(entry_id.decode(), fields[b"f"]) for entry_id, fields in entries]
