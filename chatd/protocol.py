"""Parse and validate client frames, build server frames (orjson). No I/O.

The wire contract is docs/protocol.md (from ../shared/spec/protocol.md). Parsing returns a
:class:`Command` whose fields are already checked, or raises :class:`CommandError` with
``bad_request``; building returns the bytes of one text frame's payload.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from chatd import PROTOCOL_VERSION
from chatd.codes import ErrorCode
from chatd.core.room_commands import ROOM_COMMANDS, RoomCommand, parse_grant, parse_room_command
from chatd.errors import CommandError

ROOM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MSG_ID_RE = re.compile(r"^[0-9]{1,15}-[0-9]{1,15}\Z")

AUTH_TYPES = frozenset({"auth", "login", "refresh"})
ADMIN_OPS = {
    "kick": ("user",),
    "revoke_tokens": ("user",),
    "revoke_jti": ("jti",),
    "disable_user": ("user",),
    "enable_user": ("user",),
}
MAX_HISTORY_LIMIT = 100
DEFAULT_HISTORY_LIMIT = 50


@dataclass(slots=True)
class Command:
    """One validated client command: its ``type``, optional ``ref`` and its checked fields."""

    type: str
    ref: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    #: The parsed section-9 command (``create``, ``ban``, ...), for those types.
    room_command: RoomCommand | None = None


def bad(message: str) -> CommandError:
    return CommandError(ErrorCode.BAD_REQUEST, message)


def _string(obj: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise bad(f"missing field {key!r}")
        return None
    if not isinstance(value, str) or not value:
        raise bad(f"field {key!r} must be a non-empty string")
    return value


def _name(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = _string(obj, key)
    assert value is not None
    if not pattern.match(value):
        raise bad(f"field {key!r} is not a valid {what} name")
    return value


def _msg_id(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not MSG_ID_RE.match(value):
        raise bad(f"field {key!r} must be a message id like \"1767225600123-0\"")
    return value


def _text(obj: Mapping[str, Any], max_chars: int) -> str:
    value = obj.get("text")
    if not isinstance(value, str) or not value:
        raise bad("field 'text' must be a non-empty string")
    if len(value) > max_chars:
        raise bad(f"field 'text' is longer than {max_chars} characters")
    return value


def _target(obj: Mapping[str, Any], other: str) -> dict[str, Any]:
    """Exactly one of ``room`` or ``other`` (``to`` / ``with``)."""
    has_room, has_other = "room" in obj, other in obj
    if has_room == has_other:
        raise bad(f"exactly one of 'room' or {other!r} is required")
    if has_room:
        return {"room": _name(obj, "room", ROOM_RE, "room")}
    return {other: _name(obj, other, USER_RE, "user")}


def decode(data: str | bytes) -> dict[str, Any]:
    """The JSON object of one text frame, or ``bad_request``."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise bad("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise bad("frame must be a JSON object")
    return obj


def ref_of(obj: Mapping[str, Any]) -> str | None:
    """The command's ``ref`` if it is well-formed, else None (used to answer errors)."""
    ref = obj.get("ref")
    if isinstance(ref, str) and 1 <= len(ref) <= 64:
        return ref
    return None


def parse(obj: Mapping[str, Any], *, max_text_chars: int) -> Command:
    """Validate one decoded frame into a :class:`Command`; unknown extra fields are ignored."""
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise bad("missing field 'type'")
    ref = obj.get("ref")
    if ref is not None and not (isinstance(ref, str) and 1 <= len(ref) <= 64):
        raise bad("field 'ref' must be a string of 1-64 characters")
    args: dict[str, Any]
    if kind == "join":
        args = {"room": _name(obj, "room", ROOM_RE, "room"), "since": _msg_id(obj, "since"),
                "grant": parse_grant(obj)}
    elif kind in ("leave", "who"):
        args = {"room": _name(obj, "room", ROOM_RE, "room")}
    elif kind == "send":
        args = _target(obj, "to")
        args["text"] = _text(obj, max_text_chars)
    elif kind == "history":
        args = _target(obj, "with")
        args["before"] = _msg_id(obj, "before")
        args["since"] = _msg_id(obj, "since")
        limit = obj.get("limit", DEFAULT_HISTORY_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise bad("field 'limit' must be an integer")
        if not 1 <= limit <= MAX_HISTORY_LIMIT:
            raise bad(f"field 'limit' must be between 1 and {MAX_HISTORY_LIMIT}")
        args["limit"] = limit
    elif kind == "ping":
        args = {}
    elif kind == "auth":
        args = {"token": _string(obj, "token")}
    elif kind == "refresh":
        args = {"refresh_token": _string(obj, "refresh_token")}
    elif kind == "login":
        args = {
            "username": _string(obj, "username"),
            "password": _string(obj, "password"),
            "device": _string(obj, "device", required=False) or "",
        }
        if len(args["device"]) > 64:
            raise bad("field 'device' must be at most 64 characters")
    elif kind == "logout":
        everywhere = obj.get("all", False)
        if not isinstance(everywhere, bool):
            raise bad("field 'all' must be true or false")
        args = {"all": everywhere}
    elif kind == "admin":
        op = obj.get("op")
        if not isinstance(op, str) or op not in ADMIN_OPS:
            raise bad(f"field 'op' must be one of {', '.join(ADMIN_OPS)}")
        args = {"op": op}
        for key in ADMIN_OPS[op]:
            if key == "user":
                args[key] = _name(obj, key, USER_RE, "user")
            else:
                args[key] = _string(obj, key)
        if op == "revoke_jti":
            exp = obj.get("exp")
            if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
                raise bad("field 'exp' must be a number (unix seconds)")
            args["exp"] = exp
    elif kind in ROOM_COMMANDS and kind != "delete":
        room_command = parse_room_command(obj)
        return Command(kind, ref, {"room": room_command.room}, room_command)
    else:
        raise bad(f"unknown type {kind!r}" if len(kind) <= 32 else "unknown type")
    return Command(kind, ref, args)


# --- server frames -------------------------------------------------------------------------

_dumps = orjson.dumps


def _with_ref(frame: dict[str, Any], ref: str | None) -> bytes:
    if ref is not None:
        frame["ref"] = ref
    return _dumps(frame)


def message_template(*, sender: str, text: str, room: str | None = None,
                     to: str | None = None) -> tuple[bytes, bytes]:
    """The two constant parts of a ``message`` frame, around its id.

    ``head + id + mid + ts + b"}"`` is the frame. Backends that assign ids elsewhere (a Redis Lua
    script) splice the id in without decoding JSON, so the frame is encoded exactly once.
    """
    target = b'"room":' + _dumps(room) if room is not None else b'"to":' + _dumps(to)
    head = b'{"type":"message",' + target + b',"id":"'
    mid = b'","from":' + _dumps(sender) + b',"text":' + _dumps(text) + b',"ts":'
    return head, mid


def message_frame(head: bytes, mid: bytes, msg_id: str) -> bytes:
    """Splice ``msg_id`` (``"<ms>-<seq>"``) and its timestamp into a :func:`message_template`."""
    ts = msg_id.partition("-")[0]
    return b"".join((head, msg_id.encode(), mid, ts.encode(), b"}"))


def fragments(frames: Iterable[bytes]) -> list[orjson.Fragment]:
    """Already-encoded frames, embedded as-is in a list of a larger frame."""
    return [orjson.Fragment(f) for f in frames]


def welcome(*, user: str, session: str, node: str, expires_at: int,
            tokens: Mapping[str, Any] | None = None) -> bytes:
    frame: dict[str, Any] = {"type": "welcome", "user": user, "session": session, "node": node,
                             "expires_at": expires_at, "protocol": PROTOCOL_VERSION}
    if tokens:
        frame.update(tokens)
    return _dumps(frame)


def tokens(expires_at: int, extra: Mapping[str, Any] | None = None,
           ref: str | None = None) -> bytes:
    frame: dict[str, Any] = {"type": "tokens", "expires_at": expires_at}
    if extra:
        frame.update(extra)
    return _with_ref(frame, ref)


def joined(room: str, members: list[str], history: Iterable[bytes], recovered: bool | None,
           ref: str | None) -> bytes:
    frame: dict[str, Any] = {"type": "joined", "room": room, "members": members,
                             "history": fragments(history)}
    if recovered is not None:
        frame["recovered"] = recovered
    return _with_ref(frame, ref)


def left(room: str, ref: str | None) -> bytes:
    return _with_ref({"type": "left", "room": room}, ref)


def ack(msg_id: str | None, ref: str | None) -> bytes:
    frame: dict[str, Any] = {"type": "ack"}
    if msg_id is not None:
        frame["id"] = msg_id
    return _with_ref(frame, ref)


def history(target: Mapping[str, str], messages: Iterable[bytes], ref: str | None) -> bytes:
    frame: dict[str, Any] = {"type": "history", **target, "messages": fragments(messages)}
    return _with_ref(frame, ref)


def who(room: str, members: list[str], ref: str | None) -> bytes:
    return _with_ref({"type": "who", "room": room, "members": members}, ref)


def presence(room: str, user: str, status: str) -> bytes:
    return _dumps({"type": "presence", "room": room, "user": user, "status": status})


def pong(ref: str | None = None) -> bytes:
    return _with_ref({"type": "pong"}, ref)


def error(code: ErrorCode | str, message: str, ref: str | None = None) -> bytes:
    return _with_ref({"type": "error", "code": str(code), "message": message}, ref)
