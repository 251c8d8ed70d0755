"""Rooms held in this process only: for a backend built without a state file (tests, tools).

The embedded server keeps rooms in SQLite (:mod:`chatd.backends.sqlite.rooms`) so they survive
restarts; this store has the same behaviour (the one contract suite runs on both) and forgets
everything when the process ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from chatd.backends.base import RoomInfo, RoomMember, RoomStanding, RoomStore

KINDS = ("ban", "mute")


@dataclass
class _Room:
    info: RoomInfo | None = None
    roles: dict[str, str] = field(default_factory=dict)
    restrictions: dict[tuple[str, str], float] = field(default_factory=dict)

    def empty(self) -> bool:
        return self.info is None and not self.roles and not self.restrictions


class MemoryRooms(RoomStore):
    """:class:`~chatd.backends.base.RoomStore` in dictionaries; ``clock`` gives unix seconds."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._rooms: dict[str, _Room] = {}

    def _get(self, room: str) -> _Room:
        return self._rooms.setdefault(room, _Room())

    def _tidy(self, room: str) -> None:
        r = self._rooms.get(room)
        if r is not None:
            now = self._clock()
            for key in [k for k, until in r.restrictions.items() if until <= now]:
                del r.restrictions[key]
            if r.empty():
                del self._rooms[room]

    async def create(self, room: str, owner: str | None) -> bool:
        r = self._get(room)
        if r.info is not None:
            return False
        r.info = RoomInfo(room, self._clock(), owner)
        if owner is not None:
            r.roles[owner] = "owner"
        return True

    async def delete(self, room: str) -> bool:
        r = self._rooms.pop(room, None)
        return r is not None and r.info is not None

    async def info(self, room: str) -> RoomInfo | None:
        r = self._rooms.get(room)
        return None if r is None else r.info

    async def list_rooms(self, after: str | None, limit: int) -> list[RoomInfo]:
        names = sorted(n for n, r in self._rooms.items()
                       if r.info is not None and n > (after or ""))
        return [info for n in names[:max(limit, 0)] if (info := self._rooms[n].info)]

    async def standing(self, room: str, user: str) -> RoomStanding:
        r = self._rooms.get(room)
        if r is None:
            return RoomStanding()
        now = self._clock()

        def until(kind: str) -> float | None:
            value = r.restrictions.get((user, kind))
            return value if value is not None and value > now else None

        return RoomStanding(exists=r.info is not None, role=r.roles.get(user),
                            banned_until=until("ban"), muted_until=until("mute"))

    async def set_role(self, room: str, user: str, role: str) -> None:
        self._get(room).roles[user] = role

    async def remove_member(self, room: str, user: str) -> bool:
        r = self._rooms.get(room)
        removed = r is not None and r.roles.pop(user, None) is not None
        self._tidy(room)
        return removed

    async def members(self, room: str, after: str | None, limit: int) -> list[RoomMember]:
        r = self._rooms.get(room)
        if r is None:
            return []
        names = sorted(u for u in r.roles if u > (after or ""))[:max(limit, 0)]
        return [RoomMember(u, r.roles[u]) for u in names]

    async def restrict(self, room: str, user: str, kind: str, until: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown restriction {kind!r}")
        self._get(room).restrictions[(user, kind)] = until
        self._tidy(room)

    async def lift(self, room: str, user: str, kind: str) -> bool:
        r = self._rooms.get(room)
        if r is None:
            return False
        until = r.restrictions.pop((user, kind), None)
        self._tidy(room)
        return until is not None and (math.isinf(until) or until > self._clock())
