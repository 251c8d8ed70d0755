"""``chatd room ...``: operators manage rooms (contract section 9) from the command line.

The subcommands act as a global admin through :class:`~chatd.room_service.RoomService`, the
same rules as the WebSocket commands, on the backend's room store directly (the SQLite file of
the embedded default, or Redis), so they work whether the server runs or not. With Redis,
removals and bans are also published as room changes, which every node applies to its live
connections:

    chatd room create team:acme --owner alice
    chatd room add-member team:acme bob --role moderator
    chatd room members team:acme
    chatd room ban team:acme mallory --duration 1d
    chatd room list
    chatd room token support:42 alice --ttl 10m     (a room token to send as grant on join)

Exit codes as every subcommand: 0 done, 1 the backend failed, 2 bad usage or a refusal (one
line on stderr: ``chatd room create: conflict: team:acme already exists``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
from collections.abc import Callable
from typing import Any

from chatd.config import Config, parse_duration
from chatd.core import room_commands as rc
from chatd.core.rooms import MAX_DURATION, ROLES, ROOM_RE, Actor, Policies
from chatd.errors import CommandError, ConfigError

#: The actor of every ``chatd room`` command: an operator, with the powers of a global admin.
OPERATOR = Actor(user="chatd-admin", admin=True)
PAGE = 1000


def add_room_commands(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    room = sub.add_parser("room", help="manage rooms: members, roles, bans").add_subparsers(
        dest="action", required=True, parser_class=sub._parser_class)
    p = room.add_parser("create", help="create a members room")
    p.add_argument("room")
    p.add_argument("--owner", help="user who owns it (default: none; admins own every room)")
    config_arg(p)
    p = room.add_parser("delete", help="forget a room, its member list, bans and mutes")
    p.add_argument("room")
    config_arg(p)
    p = room.add_parser("list", help="list created rooms")
    config_arg(p)
    p = room.add_parser("members", help="print the member list (user, role)")
    p.add_argument("room")
    config_arg(p)
    p = room.add_parser("add-member", help="put USER on the member list (or change their role)")
    p.add_argument("room")
    p.add_argument("user")
    p.add_argument("--role", default="member", choices=ROLES)
    config_arg(p)
    for name, text in (("remove-member", "take USER off the member list"),
                       ("unban", "lift USER's ban"), ("unmute", "lift USER's mute")):
        p = room.add_parser(name, help=text)
        p.add_argument("room")
        p.add_argument("user")
        config_arg(p)
    p = room.add_parser("token", help="print a room token (typ room+jwt) granting ROOM to USER")
    p.add_argument("room")
    p.add_argument("user")
    p.add_argument("--ttl", default="15m", help="lifetime: 30s, 15m, 7d or seconds (default 15m)")
    p.add_argument("--role", choices=ROLES, help="role the token gives in the room")
    config_arg(p)
    for name, text in (("ban", "refuse USER the room"), ("mute", "refuse USER sending")):
        p = room.add_parser(name, help=text)
        p.add_argument("room")
        p.add_argument("user")
        p.add_argument("--duration", help="30s, 15m, 7d or seconds (default: until lifted)")
        config_arg(p)


def run_room_command(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config]
                     ) -> int:
    from chatd.cli import UsageError

    where = f"chatd room {args.action}"
    if getattr(args, "room", None) is not None and not ROOM_RE.match(args.room):
        raise UsageError(f"{where}: invalid room name {args.room!r}")
    for name in ("user", "owner"):
        value = getattr(args, name, None)
        if value is not None and not rc.USER_RE.match(value):
            raise UsageError(f"{where}: invalid user name {value!r}")
    duration = None
    if getattr(args, "duration", None) is not None:
        try:
            seconds = parse_duration(args.duration, "--duration")
        except ConfigError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if not 1 <= seconds <= MAX_DURATION:
            raise UsageError(f"{where}: --duration must be from 1 second to 10 years")
        duration = round(seconds)
    if args.action == "token":
        return _token(load(args), args, where)
    return asyncio.run(_run(load(args), args, duration))


def _token(config: Config, args: argparse.Namespace, where: str) -> int:
    """A room token signed with the configured signing key, for an application or a test."""
    from chatd.auth.keys import KeyRing
    from chatd.auth.room_tokens import issue_room_token
    from chatd.auth.tokens import TokenIssuer
    from chatd.cli import UsageError

    try:
        ttl = parse_duration(args.ttl, "--ttl")
    except ConfigError as exc:
        raise UsageError(f"{where}: {exc}") from None
    if ttl <= 0:
        raise UsageError(f"{where}: --ttl must be positive")
    keyring, _ = KeyRing.from_config(config)
    issuer = TokenIssuer(keyring, issuer=config.auth.issuer, audience=config.auth.audience)
    try:
        print(issue_room_token(issuer, args.user, args.room, ttl, role=args.role))
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return 0


async def _run(config: Config, args: argparse.Namespace, duration: int | None) -> int:
    from chatd.app import create_backend
    from chatd.room_service import RoomService

    backend = create_backend(config)
    # With Redis the change reaches every node's live connections; the embedded backend has no
    # channel to a server in another process (its connections see the change on their next
    # join).
    service = RoomService(backend.rooms, Policies(config.rooms.namespaces),
                          notify=backend.broker.publish_room_change)
    try:
        try:
            return await _act(service, args, duration)
        except CommandError as exc:
            if exc.code == "unavailable":
                raise
            print(f"chatd room {args.action}: {exc.code}: {exc.message}", file=sys.stderr)
            return 2
    finally:
        backend.rooms.close()
        backend.state.close()
        await backend.broker.close()


async def _act(service: Any, args: argparse.Namespace, duration: int | None) -> int:
    action, room = args.action, getattr(args, "room", "")
    if action == "list":
        after = None
        while page := await service.store.list_rooms(after, PAGE):
            for info in page:
                print(f"{info.name}\t{_iso(info.created_at)}\t{info.owner or '-'}")
            after = page[-1].name
        return 0
    if action == "members":
        await service.access(OPERATOR, room)
        after = None
        while True:
            page, after = await service.members(OPERATOR, rc.Members(room, after, PAGE))
            for m in page:
                print(f"{m.user}\t{m.role}")
            if after is None:
                return 0
    if action == "create":
        await service.create(OPERATOR, rc.Create(room), owner=args.owner)
    elif action == "delete":
        if not await service.delete_room(room):
            print(f"chatd room delete: not_found: no room {room}", file=sys.stderr)
            return 2
    elif action == "add-member":
        if args.role == "owner":
            await service.access(OPERATOR, room)
            await service.set_owner(room, args.user)
        else:
            await service.add_member(OPERATOR, rc.AddMember(room, args.user, args.role))
    elif action == "remove-member":
        await service.remove_member(OPERATOR, rc.RemoveMember(room, args.user))
    elif action in ("ban", "mute"):
        until = await service.restrict(OPERATOR, rc.Restrict(action, room, args.user, duration))
        if duration is not None:
            print(f"room {room}: {action} {args.user} until {_iso(until)}")
            return 0
    else:
        await service.lift(OPERATOR, rc.Lift(action[2:], room, args.user))
    target = f" {args.user}" if getattr(args, "user", None) else ""
    print(f"room {room}: {action}{target} ok")
    return 0


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
