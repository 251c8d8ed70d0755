"""chatd.protocol: client frame validation and server frame shapes, by plain calls.

Every expected frame is written out from the contract (docs/protocol.md, sections 3-5) and
compared after decoding with the standard library's strict ``json`` (not orjson), so a builder
that drifts from the contract or emits invalid JSON fails here.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd import PROTOCOL_VERSION, protocol
from chatd.codes import ErrorCode
from chatd.errors import CommandError

MAX_TEXT = 4000


def parse(frame: dict[str, Any], max_text_chars: int = MAX_TEXT) -> protocol.Command:
    return protocol.parse(frame, max_text_chars=max_text_chars)


def refused(frame: dict[str, Any], max_text_chars: int = MAX_TEXT) -> CommandError:
    with pytest.raises(CommandError) as info:
        parse(frame, max_text_chars)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.message
    return info.value


def loads(data: bytes) -> Any:
    """Strict decoding: ``json`` refuses what orjson might be lenient about."""
    assert isinstance(data, bytes)
    return json.loads(data.decode("utf-8"))


NAME_64 = "a" * 64
NAME_65 = "a" * 65


# -- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("data", ["{", "not json", '{"type":"ping",}', "", "{'type':'ping'}",
                                  b"\xff\xfe"])
def test_invalid_json_is_a_bad_request(data: str | bytes) -> None:
    with pytest.raises(CommandError) as info:
        protocol.decode(data)
    assert info.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("data", ["[]", '["type","ping"]', '"ping"', "1", "null", "true"])
def test_json_that_is_not_an_object_is_a_bad_request(data: str) -> None:
    with pytest.raises(CommandError) as info:
        protocol.decode(data)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "object" in info.value.message


def test_a_json_object_decodes_from_text_or_bytes() -> None:
    assert protocol.decode('{"type":"ping"}') == {"type": "ping"}
    assert protocol.decode(b'{"type":"ping","ref":"r"}') == {"type": "ping", "ref": "r"}


# -- type and ref ----------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [{}, {"type": None}, {"type": 1}, {"type": ["ping"]}])
def test_a_frame_without_a_string_type_is_a_bad_request(frame: dict[str, Any]) -> None:
    refused(frame)


@pytest.mark.parametrize("kind", ["", "PING", "message", "welcome", "subscribe", "x" * 500])
def test_an_unknown_type_is_a_bad_request(kind: str) -> None:
    error = refused({"type": kind})
    assert "unknown type" in error.message
    assert "x" * 100 not in error.message  # a huge type is not echoed back


def test_an_unknown_type_is_named_in_the_error() -> None:
    assert "'subscribe'" in refused({"type": "subscribe"}).message


def test_ref_is_carried_on_the_command() -> None:
    assert parse({"type": "ping", "ref": "c1"}).ref == "c1"
    assert parse({"type": "ping"}).ref is None


@pytest.mark.parametrize("ref", ["r", "r" * 64, "ü" * 64, "with space and \"quotes\""])
def test_ref_of_1_to_64_characters_is_accepted(ref: str) -> None:
    assert parse({"type": "ping", "ref": ref}).ref == ref
    assert protocol.ref_of({"ref": ref}) == ref


@pytest.mark.parametrize("ref", ["", "r" * 65, 1, True, ["r"], {"r": 1}])
def test_ref_that_is_not_a_string_of_1_to_64_characters_is_a_bad_request(ref: object) -> None:
    error = refused({"type": "ping", "ref": ref})
    assert "ref" in error.message
    assert protocol.ref_of({"ref": ref}) is None


def test_unknown_extra_fields_are_ignored() -> None:
    command = parse({"type": "leave", "room": "general", "colour": "blue"})
    assert command.args == {"room": "general"}


# -- room and user names ---------------------------------------------------------------------


@pytest.mark.parametrize("room", ["general", "g", "0", NAME_64, "team.eng:backend-2_x",
                                  "a:b", "A-", "Z.9"])
def test_valid_room_names_are_accepted(room: str) -> None:
    assert parse({"type": "join", "room": room}).args["room"] == room
    assert parse({"type": "leave", "room": room}).args == {"room": room}
    assert parse({"type": "who", "room": room}).args == {"room": room}


@pytest.mark.parametrize("room", [NAME_65, "", "_general", "-x", ".x", ":x", "gen eral",
                                  "général", "general\n", "a/b", "a#b", 5, None, ["general"]])
def test_invalid_room_names_are_refused_by_every_room_command(room: object) -> None:
    for kind in ("join", "leave", "who"):
        refused({"type": kind, "room": room})
    refused({"type": "send", "room": room, "text": "hi"})
    refused({"type": "history", "room": room})


@pytest.mark.parametrize("kind", ["join", "leave", "who"])
def test_room_commands_require_a_room(kind: str) -> None:
    assert "room" in refused({"type": kind}).message


@pytest.mark.parametrize("user", ["bob", "b", "9", NAME_64, "bob.smith-2_x", "B"])
def test_valid_user_names_are_accepted_as_dm_targets(user: str) -> None:
    assert parse({"type": "send", "to": user, "text": "hi"}).args == {"to": user, "text": "hi"}
    assert parse({"type": "history", "with": user}).args["with"] == user


@pytest.mark.parametrize("user", [NAME_65, "", "_bob", "-bob", ".bob", "bob:x", "bob smith",
                                  "bøb", "bob\n", 7, ["bob"]])
def test_invalid_user_names_are_refused_as_dm_targets(user: object) -> None:
    refused({"type": "send", "to": user, "text": "hi"})
    refused({"type": "history", "with": user})


def test_a_colon_is_allowed_in_room_names_but_not_in_user_names() -> None:
    assert protocol.ROOM_RE.match("a:b")
    assert not protocol.USER_RE.match("a:b")


# -- join ------------------------------------------------------------------------------------


def test_join_without_since_has_since_none() -> None:
    command = parse({"type": "join", "room": "general", "ref": "j1"})
    assert (command.type, command.ref, command.args) == ("join", "j1",
                                                         {"room": "general", "since": None,
                                                          "grant": None})


@pytest.mark.parametrize("msg_id", ["1767225600123-0", "0-0", "1-42", "999999999999999-7"])
def test_join_since_accepts_message_ids(msg_id: str) -> None:
    assert parse({"type": "join", "room": "r", "since": msg_id}).args["since"] == msg_id


BAD_IDS = ["", "abc", "1767225600123", "1767225600123-", "-0", "1-2-3", "1.5-0", " 1-0",
           "1-0\n", "1_0", "1-a", 1767225600123, 1.0, True, ["1-0"]]


@pytest.mark.parametrize("msg_id", BAD_IDS)
def test_join_since_refuses_what_is_not_a_message_id(msg_id: object) -> None:
    assert "since" in refused({"type": "join", "room": "r", "since": msg_id}).message


# -- send ------------------------------------------------------------------------------------


def test_send_to_a_room() -> None:
    command = parse({"type": "send", "room": "general", "text": "hi", "ref": "c1"})
    assert (command.type, command.ref, command.args) == ("send", "c1",
                                                         {"room": "general", "text": "hi"})


def test_send_to_a_user() -> None:
    assert parse({"type": "send", "to": "bob", "text": "psst"}).args == {"to": "bob",
                                                                        "text": "psst"}


@pytest.mark.parametrize("frame", [
    {"type": "send", "text": "hi"},
    {"type": "send", "room": "general", "to": "bob", "text": "hi"},
])
def test_send_needs_exactly_one_of_room_or_to(frame: dict[str, Any]) -> None:
    error = refused(frame)
    assert "room" in error.message and "to" in error.message


def test_send_text_of_one_character_is_accepted() -> None:
    assert parse({"type": "send", "room": "r", "text": "x"}).args["text"] == "x"


def test_send_text_of_exactly_max_text_chars_is_accepted() -> None:
    text = "x" * MAX_TEXT
    assert parse({"type": "send", "room": "r", "text": text}).args["text"] == text


def test_send_text_over_max_text_chars_is_refused() -> None:
    error = refused({"type": "send", "room": "r", "text": "x" * (MAX_TEXT + 1)})
    assert str(MAX_TEXT) in error.message


def test_send_text_limit_counts_characters_not_bytes() -> None:
    text = "é" * 10  # 20 bytes in UTF-8
    assert parse({"type": "send", "to": "bob", "text": text}, max_text_chars=10).args["text"] \
        == text
    refused({"type": "send", "to": "bob", "text": text + "é"}, max_text_chars=10)


def test_send_text_limit_follows_the_configured_value() -> None:
    parse({"type": "send", "room": "r", "text": "abc"}, max_text_chars=3)
    refused({"type": "send", "room": "r", "text": "abcd"}, max_text_chars=3)


@pytest.mark.parametrize("text", ["", None, 5, ["hi"], {"t": "hi"}, True])
def test_send_text_must_be_a_non_empty_string(text: object) -> None:
    frame: dict[str, Any] = {"type": "send", "room": "r"}
    if text is not None:
        frame["text"] = text
    assert "text" in refused(frame).message


# -- history ---------------------------------------------------------------------------------


def test_history_of_a_room_defaults_to_50_messages_with_no_bounds() -> None:
    command = parse({"type": "history", "room": "general", "ref": "h"})
    assert command.ref == "h"
    assert command.args == {"room": "general", "before": None, "since": None, "limit": 50}
    assert protocol.DEFAULT_HISTORY_LIMIT == 50


def test_history_with_a_user_carries_bounds_and_limit() -> None:
    command = parse({"type": "history", "with": "bob", "before": "20-1", "since": "10-0",
                     "limit": 7})
    assert command.args == {"with": "bob", "before": "20-1", "since": "10-0", "limit": 7}


@pytest.mark.parametrize("frame", [
    {"type": "history"},
    {"type": "history", "room": "general", "with": "bob"},
])
def test_history_needs_exactly_one_of_room_or_with(frame: dict[str, Any]) -> None:
    error = refused(frame)
    assert "room" in error.message and "with" in error.message


@pytest.mark.parametrize("limit", [1, 2, 99, 100])
def test_history_limit_from_1_to_100_is_accepted(limit: int) -> None:
    assert parse({"type": "history", "room": "r", "limit": limit}).args["limit"] == limit


@pytest.mark.parametrize("limit", [0, -1, 101, 1000, "5", 5.0, 5.5, True, False, None, [5]])
def test_history_limit_outside_1_to_100_or_not_an_integer_is_refused(limit: object) -> None:
    assert "limit" in refused({"type": "history", "room": "r", "limit": limit}).message


@pytest.mark.parametrize("key", ["before", "since"])
@pytest.mark.parametrize("msg_id", BAD_IDS)
def test_history_bounds_must_be_message_ids(key: str, msg_id: object) -> None:
    assert key in refused({"type": "history", "with": "bob", key: msg_id}).message


# -- ping, auth, refresh, login, logout ------------------------------------------------------


def test_ping_has_no_fields() -> None:
    command = parse({"type": "ping", "ref": "p"})
    assert (command.type, command.ref, command.args) == ("ping", "p", {})


def test_auth_carries_the_token() -> None:
    assert parse({"type": "auth", "token": "a.b.c"}).args == {"token": "a.b.c"}


@pytest.mark.parametrize("token", [None, "", 5, ["a.b.c"]])
def test_auth_needs_a_non_empty_string_token(token: object) -> None:
    frame: dict[str, Any] = {"type": "auth"}
    if token is not None:
        frame["token"] = token
    assert "token" in refused(frame).message


def test_refresh_carries_the_refresh_token() -> None:
    assert parse({"type": "refresh", "refresh_token": "opaque"}).args == {
        "refresh_token": "opaque"}


@pytest.mark.parametrize("value", [None, "", 5])
def test_refresh_needs_a_non_empty_string_refresh_token(value: object) -> None:
    frame: dict[str, Any] = {"type": "refresh"}
    if value is not None:
        frame["refresh_token"] = value
    assert "refresh_token" in refused(frame).message


def test_login_with_a_device() -> None:
    command = parse({"type": "login", "username": "alice", "password": "pw", "device": "laptop"})
    assert command.args == {"username": "alice", "password": "pw", "device": "laptop"}


def test_login_device_is_optional() -> None:
    command = parse({"type": "login", "username": "alice", "password": "pw"})
    assert command.args == {"username": "alice", "password": "pw", "device": ""}


def test_login_device_of_64_characters_is_accepted_and_65_refused() -> None:
    frame = {"type": "login", "username": "alice", "password": "pw"}
    assert parse({**frame, "device": "d" * 64}).args["device"] == "d" * 64
    assert "device" in refused({**frame, "device": "d" * 65}).message


@pytest.mark.parametrize("frame", [
    {"type": "login", "password": "pw"},
    {"type": "login", "username": "alice"},
    {"type": "login", "username": "", "password": "pw"},
    {"type": "login", "username": "alice", "password": ""},
    {"type": "login", "username": 5, "password": "pw"},
    {"type": "login", "username": "alice", "password": ["pw"]},
    {"type": "login", "username": "alice", "password": "pw", "device": 5},
])
def test_login_needs_string_username_and_password(frame: dict[str, Any]) -> None:
    refused(frame)


def test_login_error_never_echoes_the_password() -> None:
    error = refused({"type": "login", "username": "alice", "password": "hunter2-secret",
                     "device": "d" * 65})
    assert "hunter2-secret" not in error.message


def test_logout_defaults_to_this_session_only() -> None:
    assert parse({"type": "logout"}).args == {"all": False}


@pytest.mark.parametrize("everywhere", [True, False])
def test_logout_all_takes_a_bool(everywhere: bool) -> None:
    assert parse({"type": "logout", "all": everywhere}).args == {"all": everywhere}


@pytest.mark.parametrize("everywhere", [1, 0, "true", "yes", []])
def test_logout_all_that_is_not_a_bool_is_refused(everywhere: object) -> None:
    assert "all" in refused({"type": "logout", "all": everywhere}).message


# -- admin -----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["kick", "revoke_tokens", "disable_user", "enable_user"])
def test_admin_user_ops_carry_the_user(op: str) -> None:
    command = parse({"type": "admin", "op": op, "user": "bob", "ref": "a"})
    assert (command.type, command.ref, command.args) == ("admin", "a", {"op": op, "user": "bob"})


@pytest.mark.parametrize("op", ["kick", "revoke_tokens", "disable_user", "enable_user"])
@pytest.mark.parametrize("user", [None, "", "_bob", "a" * 65, "bob:x", 5])
def test_admin_user_ops_need_a_valid_user_name(op: str, user: object) -> None:
    frame: dict[str, Any] = {"type": "admin", "op": op}
    if user is not None:
        frame["user"] = user
    assert "user" in refused(frame).message


def test_admin_revoke_jti_carries_jti_and_exp() -> None:
    command = parse({"type": "admin", "op": "revoke_jti", "jti": "abc", "exp": 1767225600})
    assert command.args == {"op": "revoke_jti", "jti": "abc", "exp": 1767225600}
    command = parse({"type": "admin", "op": "revoke_jti", "jti": "abc", "exp": 1767225600.5})
    assert command.args["exp"] == 1767225600.5


def test_admin_revoke_jti_exp_is_optional() -> None:
    command = parse({"type": "admin", "op": "revoke_jti", "jti": "abc"})
    assert command.args == {"op": "revoke_jti", "jti": "abc", "exp": None}


@pytest.mark.parametrize("frame", [
    {"type": "admin", "op": "revoke_jti"},
    {"type": "admin", "op": "revoke_jti", "jti": ""},
    {"type": "admin", "op": "revoke_jti", "jti": 5},
    {"type": "admin", "op": "revoke_jti", "jti": "abc", "exp": "tomorrow"},
    {"type": "admin", "op": "revoke_jti", "jti": "abc", "exp": True},
    {"type": "admin", "op": "revoke_jti", "jti": "abc", "exp": [1]},
])
def test_admin_revoke_jti_needs_a_jti_and_a_numeric_exp(frame: dict[str, Any]) -> None:
    refused(frame)


@pytest.mark.parametrize("op", [None, "", "ban", "KICK", "revoke-tokens", 1, ["kick"]])
def test_admin_with_an_unknown_op_is_refused(op: object) -> None:
    frame: dict[str, Any] = {"type": "admin", "user": "bob"}
    if op is not None:
        frame["op"] = op
    assert "op" in refused(frame).message


# -- server frames ---------------------------------------------------------------------------


def room_message(msg_id: str, text: str = "hi", sender: str = "alice",
                 room: str = "general") -> bytes:
    head, mid = protocol.message_template(sender=sender, text=text, room=room)
    return protocol.message_frame(head, mid, msg_id)


def test_welcome_has_exactly_the_contract_fields() -> None:
    frame = loads(protocol.welcome(user="alice", session="s_8f2c", node="node-a",
                                   expires_at=1767225600))
    assert frame == {"type": "welcome", "user": "alice", "session": "s_8f2c", "node": "node-a",
                     "expires_at": 1767225600, "protocol": 1}
    assert PROTOCOL_VERSION == 1


def test_welcome_after_login_carries_the_new_tokens() -> None:
    tokens = {"access_token": "a.b.c", "refresh_token": "opaque",
              "refresh_expires_at": 1767830400}
    frame = loads(protocol.welcome(user="alice", session="s_1", node="n", expires_at=1767225600,
                                   tokens=tokens))
    assert frame == {"type": "welcome", "user": "alice", "session": "s_1", "node": "n",
                     "expires_at": 1767225600, "protocol": 1, **tokens}


def test_joined_embeds_history_frames_as_messages() -> None:
    history = [room_message("1767225600123-0", "hi"), room_message("1767225600123-1", "yo")]
    frame = loads(protocol.joined("general", ["alice", "bob"], history, True, "j1"))
    assert frame == {
        "type": "joined", "room": "general", "members": ["alice", "bob"],
        "history": [
            {"type": "message", "room": "general", "id": "1767225600123-0", "from": "alice",
             "text": "hi", "ts": 1767225600123},
            {"type": "message", "room": "general", "id": "1767225600123-1", "from": "alice",
             "text": "yo", "ts": 1767225600123},
        ],
        "recovered": True, "ref": "j1",
    }


def test_joined_without_since_has_no_recovered_and_no_ref() -> None:
    frame = loads(protocol.joined("general", [], [], None, None))
    assert frame == {"type": "joined", "room": "general", "members": [], "history": []}


def test_joined_reports_an_unrecovered_gap() -> None:
    frame = loads(protocol.joined("r", ["a"], [room_message("5-0", room="r")], False, None))
    assert frame["recovered"] is False
    assert [m["id"] for m in frame["history"]] == ["5-0"]


def test_left_frame() -> None:
    assert loads(protocol.left("general", None)) == {"type": "left", "room": "general"}
    assert loads(protocol.left("general", "l1")) == {"type": "left", "room": "general",
                                                     "ref": "l1"}


def test_ack_with_a_message_id() -> None:
    assert loads(protocol.ack("1767225600123-0", "c1")) == {"type": "ack", "ref": "c1",
                                                            "id": "1767225600123-0"}


def test_ack_without_a_message_id() -> None:
    assert loads(protocol.ack(None, "a1")) == {"type": "ack", "ref": "a1"}
    assert loads(protocol.ack(None, None)) == {"type": "ack"}


def test_history_frame_of_a_room() -> None:
    frame = loads(protocol.history({"room": "general"}, [room_message("7-0")], "h1"))
    assert frame == {"type": "history", "room": "general", "ref": "h1", "messages": [
        {"type": "message", "room": "general", "id": "7-0", "from": "alice", "text": "hi",
         "ts": 7}]}


def test_history_frame_of_a_conversation() -> None:
    head, mid = protocol.message_template(sender="alice", text="psst", to="bob")
    frame = loads(protocol.history({"with": "bob"}, [protocol.message_frame(head, mid, "8-1")],
                                   None))
    assert frame == {"type": "history", "with": "bob", "messages": [
        {"type": "message", "to": "bob", "id": "8-1", "from": "alice", "text": "psst",
         "ts": 8}]}


def test_empty_history_frame() -> None:
    assert loads(protocol.history({"room": "r"}, [], None)) == {"type": "history", "room": "r",
                                                                "messages": []}


def test_who_frame() -> None:
    assert loads(protocol.who("general", ["alice", "bob"], None)) == {
        "type": "who", "room": "general", "members": ["alice", "bob"]}
    assert loads(protocol.who("general", [], "w"))["ref"] == "w"


@pytest.mark.parametrize("status", ["online", "offline"])
def test_presence_frame(status: str) -> None:
    assert loads(protocol.presence("general", "bob", status)) == {
        "type": "presence", "room": "general", "user": "bob", "status": status}


def test_tokens_frame_after_auth() -> None:
    assert loads(protocol.tokens(1767225600)) == {"type": "tokens", "expires_at": 1767225600}
    assert loads(protocol.tokens(1767225600, ref="t")) == {"type": "tokens",
                                                           "expires_at": 1767225600, "ref": "t"}


def test_tokens_frame_after_refresh_carries_the_new_tokens() -> None:
    extra = {"access_token": "a.b.c", "refresh_token": "opaque",
             "refresh_expires_at": 1767830400}
    assert loads(protocol.tokens(1767225600, extra, "r")) == {
        "type": "tokens", "expires_at": 1767225600, **extra, "ref": "r"}


def test_pong_frame() -> None:
    assert loads(protocol.pong()) == {"type": "pong"}
    assert loads(protocol.pong("p")) == {"type": "pong", "ref": "p"}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_frame_carries_code_message_and_ref(code: ErrorCode) -> None:
    assert loads(protocol.error(code, "slow down", "c9")) == {
        "type": "error", "code": code.value, "message": "slow down", "ref": "c9"}


def test_error_frame_without_ref() -> None:
    assert loads(protocol.error(ErrorCode.BAD_REQUEST, "frame must be a JSON object")) == {
        "type": "error", "code": "bad_request", "message": "frame must be a JSON object"}


def test_error_codes_are_the_contract_ones() -> None:
    assert {c.value for c in ErrorCode} == {
        "bad_request", "not_joined", "forbidden", "not_found", "rate_limited", "too_many_rooms",
        "unavailable", "internal", "conflict"}


# -- message frames spliced from a template --------------------------------------------------

TRICKY_TEXTS = [
    "hi",
    'say "hello"',
    "back\\slash \\\" \\n literally",
    "héllo wörld ✓ 你好 😀 \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "line\nbreak\ttab\rcr\x00nul\x01\x08\x0c\x1f\x7f",
    "\u2028\u2029 separators",
    '</script><script>alert("x")</script>',
    '","from":"mallory","ts":0,"x":"',
    "}{][",
    "x" * 4000,
]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_room_message_frame_is_the_contract_message_whatever_the_text(text: str) -> None:
    head, mid = protocol.message_template(sender="alice", text=text, room="general")
    frame = protocol.message_frame(head, mid, "1767225600123-0")
    assert loads(frame) == {"type": "message", "room": "general", "id": "1767225600123-0",
                            "from": "alice", "text": text, "ts": 1767225600123}


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_direct_message_frame_is_the_contract_message_whatever_the_text(text: str) -> None:
    head, mid = protocol.message_template(sender="alice", text=text, to="bob")
    frame = protocol.message_frame(head, mid, "1767225600124-3")
    assert loads(frame) == {"type": "message", "to": "bob", "id": "1767225600124-3",
                            "from": "alice", "text": text, "ts": 1767225600124}


def test_one_template_gives_a_frame_per_id() -> None:
    head, mid = protocol.message_template(sender="bob.smith-2", text="x", room="a:b")
    first = loads(protocol.message_frame(head, mid, "10-0"))
    second = loads(protocol.message_frame(head, mid, "10-1"))
    third = loads(protocol.message_frame(head, mid, "11-0"))
    assert (first["id"], first["ts"]) == ("10-0", 10)
    assert (second["id"], second["ts"]) == ("10-1", 10)
    assert (third["id"], third["ts"]) == ("11-0", 11)
    assert first["room"] == "a:b" and first["from"] == "bob.smith-2"


def test_message_frame_ts_is_an_integer_of_milliseconds() -> None:
    frame = loads(room_message("1767225600123-42"))
    assert type(frame["ts"]) is int and frame["ts"] == 1767225600123


def test_message_frame_is_utf8_without_escaped_non_ascii() -> None:
    frame = room_message("1-0", text="é😀")
    assert "é😀".encode() in frame


def test_message_frame_is_equal_to_encoding_the_whole_frame_at_once() -> None:
    """Splicing must give the same bytes a client would get from one ``dumps`` of the frame."""
    text = TRICKY_TEXTS[4]
    frame = room_message("1767225600123-0", text)
    assert frame == orjson.dumps({"type": "message", "room": "general",
                                  "id": "1767225600123-0", "from": "alice", "text": text,
                                  "ts": 1767225600123})


# -- robustness ------------------------------------------------------------------------------


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
_KEYS = ["room", "to", "with", "text", "since", "before", "limit", "token", "refresh_token",
         "username", "password", "device", "all", "op", "user", "jti", "exp", "ref"]
_TYPES = ["join", "leave", "send", "history", "who", "ping", "auth", "refresh", "login",
          "logout", "admin"]


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(_TYPES),
       fields=st.dictionaries(st.sampled_from(_KEYS), _json, max_size=6),
       op=st.one_of(st.sampled_from(list(protocol.ADMIN_OPS)), _json))
def test_any_json_object_is_a_command_or_a_bad_request_never_a_crash(
        kind: str, fields: dict[str, Any], op: Any) -> None:
    frame = {**fields, "type": kind}
    if kind == "admin":
        frame["op"] = op
    try:
        parse(frame)
    except CommandError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
