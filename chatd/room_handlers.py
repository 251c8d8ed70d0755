"""Section 9 on the WebSocket: the join rule, the room commands and live room changes.

The rules live in :mod:`chatd.core.rooms` (policy), :mod:`chatd.core.room_seats` (what a join
decided, kept per connection) and :class:`chatd.room_service.RoomService` (the policy applied to
the backend's room store); this module only connects them to connections and frames.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

from chatd import protocol
from chatd.auth.room_tokens import verify_room_token
from chatd.backends.base import RoomChange
from chatd.codes import ErrorCode
from chatd.core.room_commands import (
    AddMember,
    Create,
    Lift,
    Members,
    RemoveMember,
    Restrict,
    left_frame,
    members_frame,
)
from chatd.core.room_seats import Seat
from chatd.errors import ChatdError, CommandError
from chatd.room_service import refusal

if TYPE_CHECKING:
    from chatd.connection import Connection
    from chatd.server import Node

log = logging.getLogger("chatd")


async def seat_for_join(node: Node, conn: Connection, room: str, grant_token: str | None,
                        ref: str | None) -> Seat:
    """Decide a fresh ``join``: namespace policy, access mode, bans, ``max_members``.

    Raises:
        CommandError: ``forbidden`` / ``not_found`` with the policy's reason (nothing was set
            up yet, so a refusal leaves nothing behind).
    """
    actor = conn.session.actor
    grant = None
    if grant_token is not None:
        grant = verify_room_token(node.verifier, grant_token, user=actor.user, room=room,
                                  clock=node.clock)
    policy = node.rooms.policies.for_room(room)
    online, present = 0, False
    if policy is not None and policy.max_members:
        members = await node.backend.presence.members(room)
        online, present = len(members), actor.user in members
    allowed, standing = await node.rooms.may_join(actor, room, grant, online=online,
                                                  present=present, ref=ref)
    return Seat.take(room, allowed, standing, grant)


def check_seat(node: Node, conn: Connection, kind: str, room: str, ref: str | None) -> None:
    """``send`` / ``who`` / ``history`` on a joined room obey the join rule as it stands now."""
    seat = conn.session.seats.get(room)
    if seat is None:
        return
    now = node.clock()
    verdict = seat.may_send(now) if kind == "send" else seat.may_view(now)
    if verdict is not None:
        raise refusal(verdict, ref)


async def room_command(node: Node, conn: Connection, cmd: protocol.Command) -> None:
    """``create``, ``add_member``, ``remove_member``, ``members``, ``ban`` ... ``unmute``."""
    rc = cmd.room_command
    assert rc is not None
    actor = conn.session.actor
    service = node.rooms
    seat = conn.session.seats.get(cmd.args["room"])
    grant = seat.grant if seat is not None else None
    if isinstance(rc, Create):
        await service.create(actor, rc)
    elif isinstance(rc, Members):
        page, next_user = await service.members(actor, rc, grant)
        conn.send(members_frame(rc.room, page, next_user, cmd.ref))
        return
    elif isinstance(rc, AddMember):
        await service.add_member(actor, rc, grant)
    elif isinstance(rc, RemoveMember):
        await service.remove_member(actor, rc, grant)
    elif isinstance(rc, Restrict):
        await service.restrict(actor, rc, grant)
    elif isinstance(rc, Lift):
        await service.lift(actor, rc, grant)
    else:  # pragma: no cover - the parser only returns the types above for these commands
        raise CommandError(ErrorCode.BAD_REQUEST, f"unsupported command {cmd.type!r}")
    log.info("room", extra={"f": {"op": cmd.type, "room": rc.room, "by": actor.user,
                                  "target": getattr(rc, "user", None)}})
    conn.send(protocol.ack(None, cmd.ref))


def apply_room_change(node: Node, change: RoomChange) -> None:
    """A room change from any node: take the room from those who lost it, refresh the rest.

    Removed, banned and deleted take effect at once and without I/O (nothing more of the room
    reaches them); any other change re-reads the standing, off this call.
    """
    for member in node.hub.room_members(change.room):
        conn = cast("Connection", member)
        if change.user and conn.user != change.user:
            continue
        if change.reason:
            evict(node, conn, change.room, change.reason)
        else:
            node.spawn(_reread(node, conn, change.room))


async def _reread(node: Node, conn: Connection, room: str) -> None:
    seat = conn.session.seats.get(room)
    if seat is None or conn.closing:
        return
    try:
        standing = await node.rooms.store.standing(room, conn.user)
    except ChatdError:
        log.warning("room standing unavailable", extra={"f": {"room": room, "user": conn.user}})
        return
    policy = node.rooms.policies.for_room(room)
    reason = seat.changed(policy, conn.session.actor, standing, node.clock())
    if reason is not None:
        evict(node, conn, room, reason)


def evict(node: Node, conn: Connection, room: str, reason: str) -> None:
    """The server takes ``room`` from ``conn``: ``left`` with ``reason``, nothing more of it."""
    if room not in conn.session.rooms:
        return
    node.hub.leave(room, conn)
    conn.session.left(room)
    conn.send(left_frame(room, reason))
    node.spawn(node.release_room(conn, room))


__all__ = ["apply_room_change", "check_seat", "evict", "room_command", "seat_for_join"]
