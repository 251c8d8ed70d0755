"""The node's local registry: rooms and users to local connections, and fan-out. No I/O.

A frame for many recipients is framed once (``framer``: payload -> WebSocket frame bytes, the
same for every connection because server frames are unmasked and uncompressed) and the same bytes
are handed to each member's ``write``. What ``write`` does with a slow consumer (close 4002) is
the shell's business; the hub never waits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from chatd.backends.base import CloseMatching
from chatd.ids import id_key


class Member(Protocol):
    """A local connection as the hub sees it."""

    conn_id: str
    user: str
    sid: str | None
    jti: str
    iat: float

    def write(self, raw: bytes) -> None:
        """Queue one already-framed WebSocket frame; must not block or raise."""


class Hub:
    """Local rooms and users.

    Joining is two-step so a join racing with live traffic neither loses nor repeats a message:
    :meth:`join` adds the member in *pending* state, where room frames are buffered; once the
    shell has read history up to id X it calls :meth:`activate` with X, which flushes only the
    buffered frames newer than X.
    """

    def __init__(self, framer: Callable[[bytes], bytes]) -> None:
        self._framer = framer
        self._rooms: dict[str, dict[Member, None]] = {}
        self._pending: dict[str, dict[Member, list[tuple[str | None, bytes]]]] = {}
        self._users: dict[str, dict[Member, None]] = {}

    # -- users ---------------------------------------------------------------------------

    def add(self, member: Member) -> int:
        """Register an authenticated connection; returns the user's local connection count."""
        conns = self._users.setdefault(member.user, {})
        conns[member] = None
        return len(conns)

    def remove(self, member: Member) -> None:
        conns = self._users.get(member.user)
        if conns is not None:
            conns.pop(member, None)
            if not conns:
                del self._users[member.user]

    def user_count(self, user: str) -> int:
        return len(self._users.get(user, ()))

    @property
    def users(self) -> int:
        return len(self._users)

    @property
    def rooms(self) -> int:
        return len(self._rooms)

    # -- rooms ---------------------------------------------------------------------------

    def join(self, room: str, member: Member) -> None:
        """Add ``member`` to ``room`` in pending state (frames are buffered until activate)."""
        self._pending.setdefault(room, {})[member] = []

    def activate(self, room: str, member: Member, after: str | None) -> None:
        """Make a pending member live, flushing buffered frames newer than message id ``after``."""
        pending = self._pending.get(room)
        buffered = pending.pop(member, []) if pending is not None else []
        if pending is not None and not pending:
            del self._pending[room]
        self._rooms.setdefault(room, {})[member] = None
        floor = id_key(after) if after else None
        for msg_id, payload in buffered:
            if msg_id is None or floor is None or id_key(msg_id) > floor:
                member.write(self._framer(payload))

    def leave(self, room: str, member: Member) -> None:
        for table in (self._rooms, self._pending):
            members = table.get(room)
            if members is not None and member in members:
                del members[member]
                if not members:
                    del table[room]

    def room_members(self, room: str) -> list[Member]:
        """The local connections in ``room``, live and pending (a snapshot)."""
        return [*self._rooms.get(room, ()), *self._pending.get(room, ())]

    def members(self, room: str) -> int:
        return len(self._rooms.get(room, ())) + len(self._pending.get(room, ()))

    # -- fan-out -------------------------------------------------------------------------

    def deliver_room(self, room: str, msg_id: str | None, payload: bytes) -> int:
        """Send one frame to every local member of ``room``; returns the number of deliveries."""
        pending = self._pending.get(room)
        if pending:
            for buffer in pending.values():
                buffer.append((msg_id, payload))
        members = self._rooms.get(room)
        if not members:
            return 0
        raw = self._framer(payload)
        # Copy: a write may close a slow consumer, which leaves the room during iteration.
        for member in tuple(members):
            member.write(raw)
        return len(members)

    def deliver_user(self, user: str, payload: bytes, exclude: str | None = None) -> int:
        """Send one frame to every local connection of ``user`` except connection ``exclude``."""
        conns = self._users.get(user)
        if not conns:
            return 0
        raw = self._framer(payload)
        count = 0
        for member in tuple(conns):
            if member.conn_id != exclude:
                member.write(raw)
                count += 1
        return count

    def matching(self, event: CloseMatching) -> Iterator[Member]:
        """Local connections a control event applies to (see :class:`CloseMatching`)."""
        if event.user is not None:
            candidates: list[Member] = list(self._users.get(event.user, ()))
        else:
            candidates = [m for conns in self._users.values() for m in conns]
        for m in candidates:
            if event.sid is not None and m.sid != event.sid:
                continue
            if event.jti is not None and m.jti != event.jti:
                continue
            if event.issued_before is not None and not m.iat < event.issued_before:
                continue
            if event.except_sid is not None and m.sid == event.except_sid:
                continue
            if event.except_conn is not None and m.conn_id == event.except_conn:
                continue
            yield m

    def all_members(self) -> list[Member]:
        return [m for conns in self._users.values() for m in conns]
