"""Rooms in Redis (created rooms, member lists, bans, mutes), shared by every node.

Keys (``P`` = ``redis.prefix``); every key of one room carries the room's hash tag ``{r:ROOM}``,
like its history and channel, so a Redis Cluster keeps a room on one shard and the scripts below
touch one slot:

==========================  ======================================================================
``P{r:ROOM}:room``          hash: ``created_at``, ``owner``; exists once the room was created
``P{r:ROOM}:roles``         hash: user -> role (``owner``, ``moderator``, ``member``)
``P{r:ROOM}:mem``           zset, all scores 0: the member names, for paging in name order
``P{r:ROOM}:ban`` / ``:mute``  zset: user -> until (unix seconds, ``+inf`` until lifted)
``Prooms``                  zset, all scores 0: names of created rooms (``chatd room list``)
==========================  ======================================================================

A ban or mute past its ``until`` is ignored at once (compared with ``clock``) and removed by the
next write to the same set. ``Prooms`` lives in another slot: it is written before the room is
created and checked against ``P{r:ROOM}:room`` when listed, so a half-done create never shows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from chatd.backends.base import RoomInfo, RoomMember, RoomStanding, RoomStore
from chatd.backends.redis.client import Keys, call, text

T = TypeVar("T")
KINDS = ("ban", "mute")

# KEYS: room hash, roles, mem. ARGV: created_at, owner ('' for none).
CREATE = """
if redis.call('HSETNX', KEYS[1], 'created_at', ARGV[1]) == 0 then
  return 0
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'owner', ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[2], 'owner')
  redis.call('ZADD', KEYS[3], 0, ARGV[2])
end
return 1
"""

# KEYS: mem, roles. ARGV: lex start ('-' or '(' .. after), limit. Returns name, role, ...
MEMBERS = """
local names = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
if #names == 0 then
  return {}
end
local roles = redis.call('HMGET', KEYS[2], unpack(names))
local out = {}
for i, name in ipairs(names) do
  out[#out + 1] = name
  out[#out + 1] = roles[i] or 'member'
end
return out
"""


class RedisRooms(RoomStore):
    """:class:`~chatd.backends.base.RoomStore` in Redis.

    Args:
        client: the command client (shared with the rest of the backend).
        keys: key names.
        command_timeout: bound of each call.
        clock: unix seconds; decides which bans and mutes have ended.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys, *, command_timeout: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._r = client
        self._k = keys
        self._timeout = command_timeout
        self._clock = clock
        self._create = client.register_script(CREATE)
        self._members = client.register_script(MEMBERS)

    def _key(self, room: str, part: str) -> str:
        return f"{self._k.prefix}{{r:{room}}}:{part}"

    def _keys(self, room: str, *parts: str) -> list[str]:
        return [self._key(room, p) for p in parts]

    async def _run(self, what: str, make: Callable[[], Awaitable[T]], *,
                   idempotent: bool = True) -> T:
        return await call(what, self._timeout, make, idempotent=idempotent)

    # -- rooms -------------------------------------------------------------------------------

    async def create(self, room: str, owner: str | None) -> bool:
        index = self._k.state("rooms")
        await self._run("create_room", lambda: self._r.zadd(index, {room: 0}))
        made = await self._run("create_room", lambda: self._create(
            keys=self._keys(room, "room", "roles", "mem"),
            args=[repr(self._clock()), owner or ""]), idempotent=False)
        return bool(made)

    async def delete(self, room: str) -> bool:
        async def write() -> bool:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(room, "room"))
                pipe.delete(*self._keys(room, "roles", "mem", "ban", "mute"))
                existed, _ = await pipe.execute()
            return bool(existed)

        existed = await self._run("delete_room", write, idempotent=False)
        await self._run("delete_room", lambda: self._r.zrem(self._k.state("rooms"), room))
        return existed

    async def info(self, room: str) -> RoomInfo | None:
        raw: Any = await self._run("room_info",
                                   lambda: self._r.hgetall(self._key(room, "room")))
        return _info(room, raw)

    async def list_rooms(self, after: str | None, limit: int) -> list[RoomInfo]:
        if limit <= 0:
            return []
        index = self._k.state("rooms")
        start = f"({after}" if after else "-"

        async def read() -> list[RoomInfo]:
            found: list[RoomInfo] = []
            lo = start
            while len(found) < limit:
                raw: Any = await self._r.zrangebylex(index, lo, "+", 0, limit)
                if not raw:
                    break
                names = [n.decode() for n in raw]
                async with self._r.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.hgetall(self._key(name, "room"))
                    rows = await pipe.execute()
                found += [i for n, r in zip(names, rows, strict=True)
                          if (i := _info(n, r)) is not None]
                lo = f"({names[-1]}"
            return found[:limit]

        return await self._run("list_rooms", read)

    # -- standing ----------------------------------------------------------------------------

    async def standing(self, room: str, user: str) -> RoomStanding:
        async def read() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.exists(self._key(room, "room"))
                pipe.hget(self._key(room, "roles"), user)
                pipe.zscore(self._key(room, "ban"), user)
                pipe.zscore(self._key(room, "mute"), user)
                return list(await pipe.execute())

        exists, role, ban, mute = await self._run("room_standing", read)
        now = self._clock()
        return RoomStanding(exists=bool(exists), role=text(role),
                            banned_until=_in_force(ban, now), muted_until=_in_force(mute, now))

    # -- member list -------------------------------------------------------------------------

    async def set_role(self, room: str, user: str, role: str) -> None:
        async def write() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(self._key(room, "roles"), user, role)
                pipe.zadd(self._key(room, "mem"), {user: 0})
                await pipe.execute()

        await self._run("set_role", write)

    async def remove_member(self, room: str, user: str) -> bool:
        async def write() -> bool:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hdel(self._key(room, "roles"), user)
                pipe.zrem(self._key(room, "mem"), user)
                removed, _ = await pipe.execute()
            return bool(removed)

        return await self._run("remove_member", write, idempotent=False)

    async def members(self, room: str, after: str | None, limit: int) -> list[RoomMember]:
        if limit <= 0:
            return []
        raw: Any = await self._run("room_members", lambda: self._members(
            keys=self._keys(room, "mem", "roles"),
            args=[f"({after}" if after else "-", limit]))
        return [RoomMember(raw[i].decode(), raw[i + 1].decode()) for i in range(0, len(raw), 2)]

    # -- bans and mutes ----------------------------------------------------------------------

    async def restrict(self, room: str, user: str, kind: str, until: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown restriction {kind!r}")
        key = self._key(room, kind)
        score = "+inf" if math.isinf(until) else repr(until)

        async def write() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(key, "-inf", repr(self._clock()))
                pipe.zadd(key, {user: score})
                await pipe.execute()

        await self._run("restrict", write)

    async def lift(self, room: str, user: str, kind: str) -> bool:
        key = self._key(room, kind)

        async def write() -> bool:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.zscore(key, user)
                pipe.zrem(key, user)
                score, _ = await pipe.execute()
            return _in_force(score, self._clock()) is not None

        return await self._run("lift", write, idempotent=False)


def _in_force(score: float | None, now: float) -> float | None:
    return None if score is None or score <= now else float(score)


def _info(room: str, raw: dict[bytes, bytes]) -> RoomInfo | None:
    created = raw.get(b"created_at")
    if created is None:
        return None
    return RoomInfo(room, float(created), text(raw.get(b"owner")))
