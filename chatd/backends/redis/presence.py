"""Cluster-wide presence in Redis, with a heartbeat TTL so that a dead node leaves no ghost.

Per room, a sorted set ``P{r:ROOM}:pz`` holds one entry ``user|instance`` per node that has the
user in the room, scored by its expiry (ms), and a hash ``P{r:ROOM}:pn`` counts each user's
entries. The count makes "first connection anywhere" and "last connection everywhere" one atomic
check in the scripts below, which are the only writers of both keys:

- an entry appears and the user's count becomes 1: ``presence`` online;
- an entry goes (leave, or swept after expiry) and the count drops to 0: ``presence`` offline.

Every script first *sweeps* the room: entries whose expiry has passed are removed like a leave.
Each node refreshes its entries every ``ttl / 4`` (entries live ``3 * ttl / 4``), and that
refresh sweeps, so a killed node's users are gone from ``who`` (which reads only the hash, after a
sweep) and announced offline within ``presence.ttl`` by any node that still has the room. A room
with no live node left has no one to tell; its keys expire (``2 * ttl``).

``who`` is one script call: a sweep (nothing to do in the normal case) and ``HKEYS`` of the room's
hash, O(members); nothing is scanned across rooms or nodes.

A node that was paused longer than the TTL finds its entries swept: the refresh reports them
missing and they are added again (online) through the same path as a join.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import redis.asyncio as aioredis

from chatd import protocol
from chatd.backends.base import Presence
from chatd.backends.redis.client import Keys, call, stop, unavailable
from chatd.errors import BackendUnavailable, ChatdError

log = logging.getLogger("chatd.redis")

#: Users per script call, rooms per pipeline, when refreshing or draining.
USERS_PER_CALL = 1000
ROOMS_PER_PIPELINE = 100

# KEYS[1] zset, KEYS[2] hash. ARGV[1] now ms ('' = Redis TIME), ARGV[2] the room channel,
# ARGV[3..5] a presence frame around the user and the status (chatd.protocol.presence; user names
# never need JSON escaping).
_COMMON = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function announce(user, status)
  redis.call('PUBLISH', ARGV[2], '- ' .. ARGV[3] .. user .. ARGV[4] .. status .. ARGV[5])
end
local function gone(user)
  if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
    redis.call('HDEL', KEYS[2], user)
    announce(user, 'offline')
  end
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
for _, entry in ipairs(expired) do
  redis.call('ZREM', KEYS[1], entry)
  gone(string.match(entry, '^[^|]+'))
end
"""

# ARGV[6] instance, ARGV[7] entry ttl ms, ARGV[8] key ttl ms, ARGV[9..] users.
ADD = _COMMON + """
local exp = now + tonumber(ARGV[7])
for i = 9, #ARGV do
  if redis.call('ZADD', KEYS[1], exp, ARGV[i] .. '|' .. ARGV[6]) == 1 then
    if redis.call('HINCRBY', KEYS[2], ARGV[i], 1) == 1 then
      announce(ARGV[i], 'online')
    end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
return 1
"""

# Same arguments as ADD; only refreshes existing entries and returns the users that had none.
REFRESH = _COMMON + """
local exp = now + tonumber(ARGV[7])
local missing = {}
for i = 9, #ARGV do
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', exp, ARGV[i] .. '|' .. ARGV[6]) == 0 then
    missing[#missing + 1] = ARGV[i]
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
end
return missing
"""

# ARGV[6] instance, ARGV[7..] users.
REMOVE = _COMMON + """
for i = 7, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i] .. '|' .. ARGV[6]) == 1 then
    gone(ARGV[i])
  end
end
return 1
"""

MEMBERS = _COMMON + """
return redis.call('HKEYS', KEYS[2])
"""


class _KeyLocks:
    """One lock per (room, user), kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._locks[key]


class RedisPresence(Presence):
    """:class:`~chatd.backends.base.Presence` in Redis.

    Locally it counts connections per (room, user); Redis sees one entry per (room, user, node),
    added for the first local connection and removed with the last. Calls for one (room, user)
    are serialised so that Redis sees them in the order they were made.

    Args:
        client: the command client.
        keys: key names.
        instance: this node's unique name (entries of a restarted node are new entries).
        ttl: ``presence.ttl`` seconds.
        command_timeout: bound of each call.
        clock: unix seconds for expiry decisions; None (production) uses Redis ``TIME`` so that
            nodes with skewed clocks agree.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys, *, instance: str, ttl: float,
                 command_timeout: float, clock: Callable[[], float] | None = None) -> None:
        self._client = client
        self._keys = keys
        self._instance = instance
        self._interval = ttl / 4
        self._entry_ms = max(1, int(ttl * 750))
        self._key_ms = max(1, int(ttl * 2000))
        self._timeout = command_timeout
        self._clock = clock
        self._add = client.register_script(ADD)
        self._refresh = client.register_script(REFRESH)
        self._remove = client.register_script(REMOVE)
        self._members = client.register_script(MEMBERS)
        self._local: Counter[tuple[str, str]] = Counter()
        self._applied: dict[str, set[str]] = {}  # room -> users with an entry of ours
        self._dirty: set[tuple[str, str]] = set()  # Redis state unknown: enforce ours again
        self._locks = _KeyLocks()
        self._task: asyncio.Task[None] | None = None
        self._frames: dict[str, tuple[bytes, bytes, bytes]] = {}

    # -- lifecycle (driven by the broker: start with it, close with it) ----------------------

    def start(self) -> None:
        """Start the heartbeat (also started by the first join)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._heartbeat(), name="chatd-redis-presence")

    async def close(self) -> None:
        """Stop the heartbeat and keep the entries: they expire by TTL (a node that died)."""
        task, self._task = self._task, None
        await stop(task)

    # -- Presence ----------------------------------------------------------------------------

    async def join(self, room: str, user: str) -> None:
        key = (room, user)
        self._local[key] += 1
        self.start()
        try:
            await self._sync(key)
        except BaseException:
            self._drop(key)
            raise

    async def leave(self, room: str, user: str) -> None:
        key = (room, user)
        if not self._local.get(key):
            return
        self._drop(key)
        if not self._local.get(key):
            with contextlib.suppress(ChatdError):
                await self._sync(key)

    async def members(self, room: str) -> list[str]:
        users = await self._call(self._members, room, [])
        return sorted(u.decode() for u in users)

    async def drain(self) -> None:
        """Remove every entry of this node now (announcing offline where it was the last)."""
        await self.close()
        applied, self._applied = self._applied, {}
        self._local.clear()
        self._dirty.clear()
        await self._pipelined(self._remove, [self._instance], applied)

    # -- internals ---------------------------------------------------------------------------

    def _drop(self, key: tuple[str, str]) -> None:
        if self._local[key] <= 1:
            del self._local[key]
        else:
            self._local[key] -= 1

    async def _sync(self, key: tuple[str, str]) -> None:
        """Make Redis hold an entry for ``key`` exactly while we have a local connection."""
        room, user = key
        async with self._locks.hold(key):
            want = self._local.get(key, 0) > 0
            have = user in self._applied.get(room, ())
            force = key in self._dirty
            self._dirty.discard(key)
            try:
                if want and (force or not have):
                    await self._call(self._add, room, [self._instance, self._entry_ms,
                                                       self._key_ms, user])
                    self._applied.setdefault(room, set()).add(user)
                elif not want and (force or have):
                    users = self._applied.get(room)
                    if users is not None:
                        users.discard(user)
                        if not users:
                            del self._applied[room]
                    await self._call(self._remove, room, [self._instance, user])
            except BaseException:
                self._dirty.add(key)  # the script may or may not have run
                raise

    def _args(self, room: str, extra: Iterable[object]) -> tuple[list[str], list[object]]:
        frame = self._frames.get(room)
        if frame is None:
            a, rest = protocol.presence(room, "@user@", "@status@").split(b"@user@")
            b, c = rest.split(b"@status@")
            frame = (a, b, c)
            if len(self._frames) > 10000:
                self._frames.clear()
            self._frames[room] = frame
        now = "" if self._clock is None else str(int(self._clock() * 1000))
        return (list(self._keys.presence(room)),
                [now, self._keys.room_channel(room), *frame, *extra])

    async def _call(self, script: Any, room: str, extra: list[object], *,
                    idempotent: bool = True) -> list[bytes]:
        # Every presence script can run twice: ZADD of a present entry and ZREM of a missing
        # one change nothing, so a retry after a connection error is safe.
        keys, args = self._args(room, extra)
        return await call("presence", self._timeout,
                          lambda: script(keys=keys, args=args), idempotent=idempotent)

    async def _pipelined(self, script: object, head: list[object],
                         rooms: dict[str, set[str]]) -> list[tuple[str, list[bytes]]]:
        """Run ``script`` for every room (users in chunks), a few round trips in all.

        Returns each call's room and result. Raises BackendUnavailable after trying every chunk.
        """
        calls = [(room, users[i:i + USERS_PER_CALL])
                 for room, members in rooms.items()
                 for users in [sorted(members)]
                 for i in range(0, len(users), USERS_PER_CALL)]
        results: list[tuple[str, list[bytes]]] = []
        failed = False
        for i in range(0, len(calls), ROOMS_PER_PIPELINE):
            chunk = calls[i:i + ROOMS_PER_PIPELINE]
            try:
                with unavailable("presence"):
                    async with asyncio.timeout(self._timeout):
                        async with self._client.pipeline(transaction=False) as pipe:
                            for room, users in chunk:
                                keys, args = self._args(room, [*head, *users])
                                await script(keys=keys, args=args,  # type: ignore[operator]
                                             client=pipe)
                            replies = await pipe.execute()
                results.extend((room, r) for (room, _), r in zip(chunk, replies, strict=True))
            except BackendUnavailable:
                failed = True
        if failed:
            raise BackendUnavailable()
        return results

    async def _heartbeat(self) -> None:
        while self._task is asyncio.current_task():
            await asyncio.sleep(self._interval)
            try:
                await self._beat()
            except ChatdError as exc:
                log.debug("presence heartbeat failed: %r", exc)
            except Exception:
                log.exception("presence heartbeat failed")

    async def _beat(self) -> None:
        for key in list(self._dirty):
            with contextlib.suppress(ChatdError):
                await self._sync(key)
        if not self._applied:
            return
        rooms = {room: set(users) for room, users in self._applied.items()}
        results = await self._pipelined(
            self._refresh, [self._instance, self._entry_ms, self._key_ms], rooms)
        for room, missing in results:
            for raw in missing:
                key = (room, raw.decode())
                if self._local.get(key):
                    # Swept while we were away (paused past the TTL): add it again.
                    self._dirty.add(key)
                    with contextlib.suppress(ChatdError):
                        await self._sync(key)

    def snapshot(self) -> dict[str, set[str]]:
        """This node's entries as it believes Redis holds them (for tests and debugging)."""
        return {room: set(users) for room, users in self._applied.items()}
