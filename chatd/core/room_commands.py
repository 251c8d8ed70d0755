"""The room commands of contract section 9 as frozen dataclasses, their parser and their frames.

``parse_room_command(obj)`` checks every field of ``create``, ``add_member``, ``remove_member``,
``members``, ``ban``, ``unban``, ``mute``, ``unmute`` and ``delete`` and returns one dataclass, or
raises :class:`~chatd.errors.CommandError` ``bad_request`` naming the field. No I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from chatd.backends.base import RoomMember
from chatd.codes import ErrorCode
from chatd.core.rooms import MAX_DURATION, MAX_MEMBERS_LIMIT, MEMBER, MODERATOR, ROOM_RE
from chatd.errors import CommandError

USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MSG_ID_RE = re.compile(r"^[0-9]{1,15}-[0-9]{1,15}\Z")
REF_MAX = 64
#: The longest room token accepted as ``grant`` (as for access tokens).
MAX_GRANT_CHARS = 8192
#: Roles ``add_member`` may give on the wire (owners are made by operators: CLI, HTTP API).
ADD_ROLES = (MEMBER, MODERATOR)

ROOM_COMMANDS = frozenset({"create", "add_member", "remove_member", "members", "ban", "unban",
                           "mute", "unmute", "delete"})


@dataclass(frozen=True, slots=True)
class Create:
    room: str
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class AddMember:
    room: str
    user: str
    role: str = MEMBER
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class RemoveMember:
    room: str
    user: str
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Members:
    room: str
    after: str | None = None
    limit: int = MAX_MEMBERS_LIMIT
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Restrict:
    """``ban`` / ``mute`` (``kind``), ``duration`` seconds or None (until lifted)."""

    kind: str
    room: str
    user: str
    duration: int | None = None
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Lift:
    """``unban`` / ``unmute``: ``kind`` is ``ban`` or ``mute``."""

    kind: str
    room: str
    user: str
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """``delete`` of message ``id`` in ``room`` or in the conversation ``with`` a user."""

    id: str
    room: str | None = None
    with_user: str | None = None
    ref: str | None = None


RoomCommand = Create | AddMember | RemoveMember | Members | Restrict | Lift | Delete


def bad(message: str) -> CommandError:
    return CommandError(ErrorCode.BAD_REQUEST, message)


def _name(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = obj.get(key)
    if value is None:
        raise bad(f"missing field {key!r}")
    if not isinstance(value, str) or not pattern.match(value):
        raise bad(f"field {key!r} must be a valid {what} name")
    return value


def _optional_name(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str],
                   what: str) -> str | None:
    return None if obj.get(key) is None else _name(obj, key, pattern, what)


def _int(obj: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad(f"field {key!r} must be an integer from {lo} to {hi}")
    return value


def ref_of(obj: Mapping[str, Any]) -> str | None:
    ref = obj.get("ref")
    if ref is None:
        return None
    if not isinstance(ref, str) or not 1 <= len(ref) <= REF_MAX:
        raise bad(f"field 'ref' must be a string of 1-{REF_MAX} characters")
    return ref


def parse_grant(obj: Mapping[str, Any]) -> str | None:
    """The optional ``grant`` of ``join``: a room token (checked later, by the verifier)."""
    grant = obj.get("grant")
    if grant is None:
        return None
    if not isinstance(grant, str) or not 1 <= len(grant) <= MAX_GRANT_CHARS:
        raise bad(f"field 'grant' must be a room token of 1-{MAX_GRANT_CHARS} characters")
    return grant


def parse_room_command(obj: Mapping[str, Any]) -> RoomCommand:
    """One of the section-9 commands from a decoded frame (its ``type`` already read).

    Raises:
        CommandError: ``bad_request`` naming the missing or malformed field.
    """
    kind = obj.get("type")
    ref = ref_of(obj)
    if kind == "delete":
        msg_id = obj.get("id")
        if not isinstance(msg_id, str) or not MSG_ID_RE.match(msg_id):
            raise bad("field 'id' must be a message id")
        room = _optional_name(obj, "room", ROOM_RE, "room")
        other = _optional_name(obj, "with", USER_RE, "user")
        if (room is None) == (other is None):
            raise bad("delete needs exactly one of 'room' or 'with'")
        return Delete(msg_id, room, other, ref)
    room = _name(obj, "room", ROOM_RE, "room")
    if kind == "create":
        return Create(room, ref)
    if kind == "members":
        after = _optional_name(obj, "after", USER_RE, "user")
        limit = _int(obj, "limit", 1, MAX_MEMBERS_LIMIT)
        return Members(room, after, MAX_MEMBERS_LIMIT if limit is None else limit, ref)
    user = _name(obj, "user", USER_RE, "user")
    if kind == "add_member":
        role = obj.get("role", MEMBER)
        if role not in ADD_ROLES:
            raise bad("field 'role' must be member or moderator")
        return AddMember(room, user, role, ref)
    if kind == "remove_member":
        return RemoveMember(room, user, ref)
    if kind in ("ban", "mute"):
        return Restrict(kind, room, user, _int(obj, "duration", 1, MAX_DURATION), ref)
    if kind in ("unban", "unmute"):
        return Lift(kind[2:], room, user, ref)
    raise bad(f"unknown type {kind!r}")


# -- frames -------------------------------------------------------------------------------------


def _with_ref(frame: dict[str, Any], ref: str | None) -> bytes:
    if ref is not None:
        frame["ref"] = ref
    return orjson.dumps(frame)


def members_frame(room: str, members: Sequence[RoomMember], next_user: str | None,
                  ref: str | None = None) -> bytes:
    """``{"type":"members","room",...,"members":[{"user","role"}...],"next"?}``."""
    frame: dict[str, Any] = {"type": "members", "room": room,
                             "members": [{"user": m.user, "role": m.role} for m in members]}
    if next_user is not None:
        frame["next"] = next_user
    return _with_ref(frame, ref)


def left_frame(room: str, reason: str | None = None, ref: str | None = None) -> bytes:
    """``left``, with ``reason`` (``removed``, ``banned``, ``deleted``) when the server took it."""
    frame: dict[str, Any] = {"type": "left", "room": room}
    if reason:
        frame["reason"] = reason
    return _with_ref(frame, ref)


def deleted_frame(msg_id: str, by: str, *, room: str | None = None,
                  with_user: str | None = None) -> bytes:
    """``{"type":"deleted","room"|"with",...,"id","by"}`` for every member (or both users)."""
    frame: dict[str, Any] = {"type": "deleted"}
    if room is not None:
        frame["room"] = room
    else:
        frame["with"] = with_user
    frame["id"] = msg_id
    frame["by"] = by
    return orjson.dumps(frame)


def tombstone(msg_id: str, sender: str, ts: int) -> bytes:
    """What ``history`` returns in place of a deleted message: no ``text``."""
    return orjson.dumps({"id": msg_id, "from": sender, "ts": ts, "deleted": True})
