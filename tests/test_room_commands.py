"""Parsing the section-9 commands: every field checked, every bad one named; frames as specified.

Plain examples first, then hypothesis over the fields with the strategies of tests/test_fuzz.py:
any JSON in any field is a command or ``bad_request``, never another exception.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.backends.base import RoomMember
from chatd.codes import ErrorCode
from chatd.core import room_commands as rc
from chatd.core.room_commands import (
    AddMember,
    Create,
    Delete,
    Lift,
    Members,
    RemoveMember,
    Restrict,
    parse_grant,
    parse_room_command,
)
from chatd.core.rooms import MAX_DURATION
from chatd.errors import CommandError
from tests.test_fuzz import json_values, msg_ids, refs, room_names, user_names

SCALE = max(1, int(os.environ.get("CHATD_FUZZ_SCALE", "1")))


def bad(obj: dict[str, Any]) -> str:
    with pytest.raises(CommandError) as info:
        parse_room_command(obj)
    assert info.value.code == ErrorCode.BAD_REQUEST
    return info.value.message


@pytest.mark.parametrize(("obj", "command"), [
    ({"type": "create", "room": "team:acme", "ref": "c1"}, Create("team:acme", "c1")),
    ({"type": "add_member", "room": "team:acme", "user": "bob"},
     AddMember("team:acme", "bob", "member")),
    ({"type": "add_member", "room": "team:acme", "user": "bob", "role": "moderator"},
     AddMember("team:acme", "bob", "moderator")),
    ({"type": "remove_member", "room": "r", "user": "bob"}, RemoveMember("r", "bob")),
    ({"type": "members", "room": "r"}, Members("r", None, 1000)),
    ({"type": "members", "room": "r", "after": "bob", "limit": 5}, Members("r", "bob", 5)),
    ({"type": "ban", "room": "r", "user": "eve"}, Restrict("ban", "r", "eve", None)),
    ({"type": "ban", "room": "r", "user": "eve", "duration": 3600},
     Restrict("ban", "r", "eve", 3600)),
    ({"type": "mute", "room": "r", "user": "eve", "duration": 1}, Restrict("mute", "r", "eve", 1)),
    ({"type": "unban", "room": "r", "user": "eve"}, Lift("ban", "r", "eve")),
    ({"type": "unmute", "room": "r", "user": "eve"}, Lift("mute", "r", "eve")),
    ({"type": "delete", "room": "r", "id": "1-0"}, Delete("1-0", "r", None)),
    ({"type": "delete", "with": "bob", "id": "1-0", "ref": "d"}, Delete("1-0", None, "bob", "d")),
])
def test_each_room_command_parses_to_its_dataclass(obj: dict[str, Any], command: object) -> None:
    assert parse_room_command(obj) == command


@pytest.mark.parametrize(("obj", "message"), [
    ({"type": "create"}, "missing field 'room'"),
    ({"type": "create", "room": "a b"}, "field 'room' must be a valid room name"),
    ({"type": "create", "room": "x" * 65}, "field 'room' must be a valid room name"),
    ({"type": "add_member", "room": "r"}, "missing field 'user'"),
    ({"type": "add_member", "room": "r", "user": "a:b"}, "field 'user' must be a valid user name"),
    ({"type": "add_member", "room": "r", "user": "b", "role": "owner"},
     "field 'role' must be member or moderator"),
    ({"type": "add_member", "room": "r", "user": "b", "role": None}, "field 'role'"),
    ({"type": "members", "room": "r", "limit": 0}, "field 'limit' must be an integer from 1"),
    ({"type": "members", "room": "r", "limit": 1001}, "to 1000"),
    ({"type": "members", "room": "r", "limit": True}, "field 'limit'"),
    ({"type": "members", "room": "r", "after": 3}, "field 'after'"),
    ({"type": "ban", "room": "r", "user": "e", "duration": 0}, "field 'duration'"),
    ({"type": "ban", "room": "r", "user": "e", "duration": 1.5}, "field 'duration'"),
    ({"type": "ban", "room": "r", "user": "e", "duration": MAX_DURATION + 1}, "field 'duration'"),
    ({"type": "mute", "room": "r", "user": "e", "duration": "1h"}, "field 'duration'"),
    ({"type": "delete", "room": "r"}, "field 'id' must be a message id"),
    ({"type": "delete", "id": "1-0"}, "delete needs exactly one of 'room' or 'with'"),
    ({"type": "delete", "id": "1-0", "room": "r", "with": "b"}, "exactly one"),
    ({"type": "create", "room": "r", "ref": ""}, "field 'ref'"),
    ({"type": "create", "room": "r", "ref": "x" * 65}, "field 'ref'"),
    ({"type": "kick", "room": "r", "user": "b"}, "unknown type 'kick'"),
])
def test_a_bad_field_is_bad_request_naming_it(obj: dict[str, Any], message: str) -> None:
    assert message in bad(obj)


def test_the_grant_of_join_is_a_bounded_string() -> None:
    assert parse_grant({"type": "join", "room": "r"}) is None
    assert parse_grant({"grant": "a.b.c"}) == "a.b.c"
    for value in ("", 7, ["x"], "x" * 8193):
        with pytest.raises(CommandError) as info:
            parse_grant({"grant": value})
        assert "field 'grant'" in info.value.message


def test_the_frames_are_the_contracts() -> None:
    page = [RoomMember("alice", "owner"), RoomMember("bob", "member")]
    assert orjson.loads(rc.members_frame("team:acme", page, "bob", "m1")) == {
        "type": "members", "room": "team:acme", "next": "bob", "ref": "m1",
        "members": [{"user": "alice", "role": "owner"}, {"user": "bob", "role": "member"}]}
    assert "next" not in orjson.loads(rc.members_frame("r", page, None))
    assert orjson.loads(rc.left_frame("r", "banned")) == {"type": "left", "room": "r",
                                                         "reason": "banned"}
    assert orjson.loads(rc.left_frame("r", ref="x")) == {"type": "left", "room": "r", "ref": "x"}
    assert orjson.loads(rc.deleted_frame("1-0", "alice", room="r")) == {
        "type": "deleted", "room": "r", "id": "1-0", "by": "alice"}
    assert orjson.loads(rc.deleted_frame("1-0", "alice", with_user="bob")) == {
        "type": "deleted", "with": "bob", "id": "1-0", "by": "alice"}
    assert orjson.loads(rc.tombstone("1-0", "alice", 1)) == {"id": "1-0", "from": "alice",
                                                             "ts": 1, "deleted": True}


# -- fuzzing ------------------------------------------------------------------------------------

FIELDS = {"create": ["room"], "add_member": ["room", "user", "role"],
          "remove_member": ["room", "user"], "members": ["room", "after", "limit"],
          "ban": ["room", "user", "duration"], "unban": ["room", "user"],
          "mute": ["room", "user", "duration"], "unmute": ["room", "user"],
          "delete": ["room", "with", "id"]}
PLAUSIBLE = {"room": room_names, "user": user_names, "with": user_names, "after": user_names,
             "id": msg_ids, "ref": refs, "role": st.sampled_from(["member", "moderator", "owner"]),
             "limit": st.integers(-2, 1002), "duration": st.integers(-2, MAX_DURATION + 2)}


@st.composite
def room_commandish(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(FIELDS)))
    obj: dict[str, Any] = {"type": kind}
    for key in [*FIELDS[kind], "ref"]:
        how = draw(st.integers(0, 9))
        if how < 6:
            obj[key] = draw(PLAUSIBLE[key])
        elif how < 8:
            obj[key] = draw(json_values)
    return obj


@settings(max_examples=1500 * SCALE, deadline=None)
@given(room_commandish())
def test_any_room_command_is_parsed_or_bad_request(obj: dict[str, Any]) -> None:
    try:
        command = parse_room_command(obj)
    except CommandError as exc:
        assert exc.code == ErrorCode.BAD_REQUEST and exc.message
        return
    # What parses is exactly what the contract allows.
    assert rc.ROOM_RE.match(getattr(command, "room", None) or "r")
    for name in ("user", "with_user", "after"):
        value = getattr(command, name, None)
        assert value is None or rc.USER_RE.match(value)
    limit = getattr(command, "limit", 1)
    assert 1 <= limit <= 1000
    duration = getattr(command, "duration", None)
    assert duration is None or 1 <= duration <= MAX_DURATION
