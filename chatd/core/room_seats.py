"""A connection's seat in each room it joined: the verdict of ``join``, kept and kept true.

``join`` reads the user's standing from the backend once. A :class:`Seat` keeps what that read
decided (role, mute, room-token expiry) so that ``send``, ``who`` and ``history`` check the same
rule without a backend round trip per command; every change to the standing reaches the seat as
a room change (a control event on every node, :class:`chatd.room_service.RoomChange`), which
:meth:`Seat.changed` applies. Time only moves forward through the ``now`` arguments, so mutes
and grants end by themselves. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatd.backends.base import RoomStanding
from chatd.config import RoomNamespace
from chatd.core import rooms
from chatd.core.rooms import Actor, Allowed, Grant, Refusal

#: ``left`` reasons: the room was taken from the connection.
REMOVED, BANNED, DELETED = "removed", "banned", "deleted"


@dataclass(slots=True)
class Seat:
    """One connection in one room: its effective role, mute and grant.

    Build it with :meth:`take` after a successful join.
    """

    room: str
    verdict: Allowed
    muted_until: float | None = None
    grant: Grant | None = None

    @classmethod
    def take(cls, room: str, verdict: Allowed, standing: RoomStanding,
             grant: Grant | None = None) -> Seat:
        return cls(room, verdict, standing.muted_until, grant)

    def lapsed(self, now: float) -> Refusal | None:
        """The room token the seat stood on expired: the room is lost like a removal."""
        if self.verdict.until <= now:
            return Refusal(rooms.FORBIDDEN, f"{self.room} is not granted by your token")
        return None

    def may_view(self, now: float) -> Refusal | None:
        """``who`` and ``history``: the join rule, as it stands now."""
        return self.lapsed(now)

    def may_send(self, now: float) -> Refusal | None:
        """``send``: the join rule, then a mute (admins are never muted)."""
        lapsed = self.lapsed(now)
        if lapsed is not None:
            return lapsed
        if not self.verdict.admin and self.muted_until is not None and self.muted_until > now:
            return Refusal(rooms.FORBIDDEN,
                           rooms.describe_until("muted", self.room, self.muted_until))
        return None

    def may_delete(self, author: str, user: str) -> Refusal | None:
        if author != user and self.verdict.rank < rooms.MODERATOR_RANK:
            return Refusal(rooms.FORBIDDEN, "only the author or a moderator may delete a message")
        return None

    def changed(self, policy: RoomNamespace | None, actor: Actor, standing: RoomStanding,
                now: float) -> str | None:
        """Apply the standing read after a room change; returns a ``left`` reason or None.

        ``policy`` is the namespace policy the seat was taken under (a reload does not take
        rooms away from connections already in them).
        """
        verdict = rooms.access(policy, self.room, actor, standing, now, self.grant)
        if isinstance(verdict, Refusal):
            active = standing.banned_until is not None and standing.banned_until > now
            return BANNED if active and not actor.admin else REMOVED
        self.verdict = verdict
        self.muted_until = standing.muted_until
        return None
