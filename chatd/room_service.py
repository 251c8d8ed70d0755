"""Room commands carried out: the policy of :mod:`chatd.core.rooms` applied to the room store.

One implementation for every caller: the WebSocket commands, the HTTP API and ``chatd room``.
Each call reads what it needs from the :class:`~chatd.backends.base.RoomStore` (one standing
look-up per user involved), asks the policy, writes, and reports what live connections must
learn as a :class:`RoomChange` through ``notify`` (the node turns it into a control event that
reaches every node: ``left`` with ``reason`` for removed and banned users).

Refusals raise :class:`~chatd.errors.CommandError` with the policy's code and message, so the
caller answers an ``error`` frame (or an HTTP status, or a CLI line).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from chatd.backends.base import RoomChange, RoomMember, RoomStanding, RoomStore
from chatd.codes import ErrorCode
from chatd.core import rooms
from chatd.core.room_commands import AddMember, Create, Lift, Members, RemoveMember, Restrict
from chatd.core.rooms import Actor, Allowed, Grant, Policies, Refusal
from chatd.errors import CommandError

__all__ = ["BANNED", "DELETED", "REMOVED", "RoomChange", "RoomService", "refusal"]

#: ``reason`` of a :class:`RoomChange` that takes the room from the user's connections.
REMOVED, BANNED, DELETED = "removed", "banned", "deleted"


Notify = Callable[[RoomChange], Awaitable[None]]


async def _nobody(change: RoomChange) -> None:
    """The default ``notify``: no live connections to tell (tools, tests of the store)."""


def refusal(r: Refusal, ref: str | None = None) -> CommandError:
    return CommandError(ErrorCode(r.code), r.message, ref)


class RoomService:
    """Room commands against one store.

    Attributes:
        policies: the namespace policies; replace it on reload (joins from then on use it).
    """

    def __init__(self, store: RoomStore, policies: Policies, *, notify: Notify = _nobody,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.policies = policies
        self._notify = notify
        self._clock = clock

    # -- the rule of join, who, history, members, send --------------------------------------

    async def access(self, actor: Actor, room: str, grant: Grant | None = None, *,
                     ref: str | None = None) -> Allowed:
        """The join rule without the room-full check (``who``, ``history``, ``members``)."""
        standing = await self.store.standing(room, actor.user)
        return self._allowed(rooms.access(self.policies.for_room(room), room, actor, standing,
                                          self._clock(), grant), ref)

    async def may_join(self, actor: Actor, room: str, grant: Grant | None = None, *,
                       online: int = 0, present: bool = False,
                       ref: str | None = None) -> tuple[Allowed, RoomStanding]:
        """``join``: access plus ``max_members``; also returns the standing (mute) to keep."""
        standing = await self.store.standing(room, actor.user)
        verdict = rooms.may_join(self.policies.for_room(room), room, actor, standing,
                                 self._clock(), online=online, present=present, grant=grant)
        return self._allowed(verdict, ref), standing

    async def may_send(self, actor: Actor, room: str, grant: Grant | None = None, *,
                       ref: str | None = None) -> Allowed:
        standing = await self.store.standing(room, actor.user)
        return self._allowed(rooms.may_send(self.policies.for_room(room), room, actor, standing,
                                            self._clock(), grant), ref)

    @staticmethod
    def _allowed(verdict: Allowed | Refusal, ref: str | None) -> Allowed:
        if isinstance(verdict, Refusal):
            raise refusal(verdict, ref)
        return verdict

    # -- the section-9 commands -------------------------------------------------------------

    async def create(self, actor: Actor, cmd: Create, *, owner: str | None = None) -> None:
        """``create``: the creator becomes the owner.

        An admin records no owner (admins own every room) unless it names one (``owner``: the
        CLI and the HTTP API create rooms on behalf of a user).
        """
        policy = self.policies.for_room(cmd.room)
        pre = rooms.may_create(policy, cmd.room, actor, exists=False)
        if pre is not None:
            raise refusal(pre, cmd.ref)
        if not actor.admin:
            owner = actor.user
        if not await self.store.create(cmd.room, owner):
            conflict = rooms.may_create(policy, cmd.room, actor, exists=True)
            assert conflict is not None
            raise refusal(conflict, cmd.ref)

    async def members(self, actor: Actor, cmd: Members,
                      grant: Grant | None = None) -> tuple[list[RoomMember], str | None]:
        """One page of the member list and the ``next`` cursor (None on the last page)."""
        await self.access(actor, cmd.room, grant, ref=cmd.ref)
        page = await self.store.members(cmd.room, cmd.after, cmd.limit + 1)
        if len(page) > cmd.limit:
            return page[:cmd.limit], page[cmd.limit - 1].user
        return page, None

    async def _moderate(self, command: str, actor: Actor, room: str, user: str, ref: str | None,
                        grant: Grant | None, role: str | None = None) -> RoomStanding:
        mine = await self.store.standing(room, actor.user)
        theirs = await self.store.standing(room, user)
        refused = rooms.may_moderate(command, self.policies.for_room(room), room, actor, mine,
                                     self._clock(), target=user, target_standing=theirs,
                                     role=role, grant=grant)
        if refused is not None:
            raise refusal(refused, ref)
        return theirs

    async def add_member(self, actor: Actor, cmd: AddMember, grant: Grant | None = None) -> None:
        before = await self._moderate("add_member", actor, cmd.room, cmd.user, cmd.ref, grant,
                                      cmd.role)
        if before.role != cmd.role:
            await self.store.set_role(cmd.room, cmd.user, cmd.role)
            await self._notify(RoomChange(cmd.room, cmd.user))

    async def remove_member(self, actor: Actor, cmd: RemoveMember,
                            grant: Grant | None = None) -> None:
        """``remove_member``; in a ``members`` room the user loses it on every node."""
        await self._moderate("remove_member", actor, cmd.room, cmd.user, cmd.ref, grant)
        if await self.store.remove_member(cmd.room, cmd.user):
            policy = self.policies.for_room(cmd.room)
            gone = policy is not None and policy.access == rooms.MEMBERS
            await self._notify(RoomChange(cmd.room, cmd.user, REMOVED if gone else ""))

    async def restrict(self, actor: Actor, cmd: Restrict, grant: Grant | None = None) -> float:
        """``ban`` / ``mute``; returns when it ends (``inf``: until lifted)."""
        await self._moderate(cmd.kind, actor, cmd.room, cmd.user, cmd.ref, grant)
        until = rooms.expiry(self._clock(), cmd.duration)
        await self.store.restrict(cmd.room, cmd.user, cmd.kind, until)
        await self._notify(RoomChange(cmd.room, cmd.user, BANNED if cmd.kind == "ban" else ""))
        return until

    async def lift(self, actor: Actor, cmd: Lift, grant: Grant | None = None) -> None:
        """``unban`` / ``unmute`` (idempotent: lifting what is not in force is fine)."""
        await self._moderate("un" + cmd.kind, actor, cmd.room, cmd.user, cmd.ref, grant)
        if await self.store.lift(cmd.room, cmd.user, cmd.kind):
            await self._notify(RoomChange(cmd.room, cmd.user))

    # -- operators (CLI, HTTP API) ----------------------------------------------------------

    async def delete_room(self, room: str) -> bool:
        """Forget a created room; everyone in it loses it (``left`` with ``deleted``)."""
        existed = await self.store.delete(room)
        if existed:
            await self._notify(RoomChange(room, "", DELETED))
        return existed

    async def set_owner(self, room: str, user: str) -> None:
        """Make ``user`` an owner (operators only: no command gives the owner role)."""
        await self.store.set_role(room, user, rooms.OWNER)
        await self._notify(RoomChange(room, user))
