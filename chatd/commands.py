"""Carrying out validated commands of a ready connection (contract section 3).

:class:`~chatd.session.Session` has already decided the command may run; these coroutines do
the backend work and answer. Backend failures surface as ``BackendUnavailable`` (``unavailable``)
and leave no half-done state behind: a join that fails is rolled back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatd import protocol
from chatd.backends.base import dm_stream, room_stream
from chatd.codes import CloseCode, ErrorCode
from chatd.errors import CloseConnection, CommandError
from chatd.room_handlers import check_seat, room_command, seat_for_join

if TYPE_CHECKING:
    from chatd.connection import Connection
    from chatd.server import Node

async def join(node: Node, conn: Connection, cmd: protocol.Command) -> None:
    room: str = cmd.args["room"]
    since: str | None = cmd.args["since"]
    b = node.backend
    fresh = room not in conn.session.rooms
    if fresh:
        seat = await seat_for_join(node, conn, room, cmd.args["grant"], cmd.ref)
        # Pending first: frames published from now on are buffered, then filtered against the
        # history we read, so nothing is lost or repeated between history and live traffic.
        node.hub.join(room, conn)
        try:
            await b.broker.subscribe_room(room)
        except BaseException:
            node.hub.leave(room, conn)
            raise
        try:
            await b.presence.join(room, conn.user)
        except BaseException:
            node.hub.leave(room, conn)
            b.broker.release_room(room)
            raise
        conn.session.joined(room, seat)
    try:
        recovered: bool | None = None
        if since is not None:
            messages, recovered = await b.broker.replay(room_stream(room), since,
                                                       node.config.history.max_replay)
        else:
            messages = await b.broker.recent(room_stream(room), node.config.history.on_join)
        members = await b.presence.members(room)
    except BaseException:
        if fresh:
            await node.leave_room(conn, room)
        raise
    conn.send(protocol.joined(room, members, (m.frame for m in messages), recovered, cmd.ref))
    if fresh:
        last = messages[-1].id if messages else since
        node.hub.activate(room, conn, last)
        node.metrics.rooms.set(node.hub.rooms)


async def leave(node: Node, conn: Connection, cmd: protocol.Command) -> None:
    room: str = cmd.args["room"]
    if room in conn.session.rooms:
        await node.leave_room(conn, room)
    conn.send(protocol.left(room, cmd.ref))


async def send(node: Node, conn: Connection, cmd: protocol.Command) -> None:
    text: str = cmd.args["text"]
    broker = node.backend.broker
    if "room" in cmd.args:
        check_seat(node, conn, "send", cmd.args["room"], cmd.ref)
        msg = await broker.publish_room(cmd.args["room"], conn.user, text)
    else:
        to: str = cmd.args["to"]
        if to != conn.user and not await node.backend.state.user_known(to):
            raise CommandError(ErrorCode.NOT_FOUND, f"unknown user {to!r}")
        msg = await broker.publish_direct(conn.user, to, text, conn.conn_id)
    node.metrics.messages_out.inc()
    conn.send(protocol.ack(msg.id, cmd.ref))


async def history(node: Node, conn: Connection, cmd: protocol.Command) -> None:
    if "room" in cmd.args:
        check_seat(node, conn, "history", cmd.args["room"], cmd.ref)
        target = {"room": cmd.args["room"]}
        stream = room_stream(cmd.args["room"])
    else:
        target = {"with": cmd.args["with"]}
        stream = dm_stream(conn.user, cmd.args["with"])
    messages = await node.backend.broker.history(
        stream, before=cmd.args["before"], since=cmd.args["since"], limit=cmd.args["limit"])
    conn.send(protocol.history(target, (m.frame for m in messages), cmd.ref))


async def who(node: Node, conn: Connection, cmd: protocol.Command) -> None:
    room: str = cmd.args["room"]
    check_seat(node, conn, "who", room, cmd.ref)
    members = await node.backend.presence.members(room)
    conn.send(protocol.who(room, members, cmd.ref))


async def ping(node: Node, conn: Connection, cmd: protocol.Command) -> None:
    conn.send(protocol.pong(cmd.ref))


async def auth(node: Node, conn: Connection, cmd: protocol.Command) -> None:
    """In-band renewal with a fresh access token (same user)."""
    claims = await node.verify_token(cmd.args["token"], in_band=True)
    conn.session.renewed(claims)
    node.bind(conn, claims)
    conn.send(protocol.tokens(int(claims.exp), ref=cmd.ref))


async def refresh(node: Node, conn: Connection, cmd: protocol.Command) -> None:
    claims, extra = await node.refresh(cmd.args["refresh_token"], conn)
    conn.session.renewed(claims)
    node.bind(conn, claims)
    conn.send(protocol.tokens(int(claims.exp), extra, ref=cmd.ref))


async def logout(node: Node, conn: Connection, cmd: protocol.Command) -> None:
    await node.logout(conn, everywhere=cmd.args["all"])
    raise CloseConnection(CloseCode.NORMAL, "logged out")


async def admin(node: Node, conn: Connection, cmd: protocol.Command) -> None:
    """Contract section 6; the session has checked the admin role."""
    op: str = cmd.args["op"]
    accounts = node.accounts
    if op == "kick":
        await accounts.kick(cmd.args["user"])
    elif op == "revoke_tokens":
        await accounts.revoke_tokens(cmd.args["user"])
    elif op == "revoke_jti":
        await accounts.revoke_jti(cmd.args["jti"], cmd.args["exp"])
    elif op == "disable_user":
        await accounts.disable_user(cmd.args["user"])
    elif op == "enable_user" and not await accounts.enable_user(cmd.args["user"]):
        raise CommandError(ErrorCode.NOT_FOUND, f"unknown user {cmd.args['user']!r}")
    node.log.info("admin", extra={"f": {"op": op, "by": conn.user,
                                        "target": cmd.args.get("user") or cmd.args.get("jti")}})
    conn.send(protocol.ack(None, cmd.ref))


HANDLERS = {
    "join": join, "leave": leave, "send": send, "history": history, "who": who, "ping": ping,
    "auth": auth, "refresh": refresh, "logout": logout, "admin": admin,
    **{kind: room_command for kind in ("create", "add_member", "remove_member", "members", "ban",
                                       "unban", "mute", "unmute")},
}

__all__ = ["HANDLERS"]
