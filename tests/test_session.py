"""chatd.session: the per-connection state machine, driven by plain calls and a hand-moved clock.

Each test feeds text (or binary) frames to :meth:`Session.receive` and checks the command it
lets through, the ``error`` it answers (:class:`CommandError`, socket kept) or the close it
demands (:class:`CloseConnection`), as contract sections 1, 2, 3, 5 and 7 say.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from chatd.auth.tokens import Claims
from chatd.codes import CloseCode, ErrorCode
from chatd.config import LimitsConfig
from chatd.errors import CloseConnection, CommandError
from chatd.session import Phase, Session


class Clock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ALICE = Claims(sub="alice", jti="j1", iat=1_800_000_000.0, exp=1_800_000_900.0, sid="s1")
ADMIN = Claims(sub="root", jti="j2", iat=1_800_000_000.0, exp=1_800_000_900.0, role="admin")
#: Generous rate limits, so tests about something else never meet the bucket.
ROOMY = LimitsConfig(rate=1000.0, burst=10_000, max_rate_limited=10_000)


def frame(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


def new_session(limits: LimitsConfig = ROOMY, clock: Clock | None = None) -> Session:
    return Session(limits, clock or Clock())


def ready(limits: LimitsConfig = ROOMY, claims: Claims = ALICE,
          clock: Clock | None = None) -> Session:
    session = new_session(limits, clock)
    session.receive(frame("auth", token="a.b.c"))
    session.authenticated(claims)
    assert session.phase is Phase.READY
    return session


def error_of(session: Session, data: str) -> CommandError:
    with pytest.raises(CommandError) as info:
        session.receive(data)
    return info.value


def close_of(session: Session, data: str | bytes) -> CloseConnection:
    with pytest.raises(CloseConnection) as info:
        session.receive(data)
    return info.value


# -- awaiting authentication -----------------------------------------------------------------


def test_a_new_session_awaits_authentication() -> None:
    assert new_session().phase is Phase.AWAITING_AUTH


@pytest.mark.parametrize("data,kind", [
    (frame("auth", token="a.b.c"), "auth"),
    (frame("login", username="alice", password="pw"), "login"),
    (frame("login", username="alice", password="pw", device="phone"), "login"),
    (frame("refresh", refresh_token="opaque"), "refresh"),
])
def test_awaiting_auth_accepts_auth_login_and_refresh(data: str, kind: str) -> None:
    session = new_session()
    assert session.receive(data).type == kind
    assert session.phase is Phase.AWAITING_AUTH  # until the shell reports success


@pytest.mark.parametrize("data", [
    frame("ping"),
    frame("join", room="general"),
    frame("send", room="general", text="hi"),
    frame("logout"),
    frame("admin", op="kick", user="bob"),
    frame("history", room="general"),
])
def test_awaiting_auth_closes_4401_on_any_other_command(data: str) -> None:
    closed = close_of(new_session(), data)
    assert closed.code is CloseCode.BAD_CREDENTIAL
    assert int(closed.code) == 4401
    assert "auth" in closed.reason


@pytest.mark.parametrize("data", [
    "not json", "[]", '"auth"', "{}", frame("auth"), frame("auth", token=""),
    frame("login", username="alice"), frame("refresh"), frame("hello"),
    frame("auth", token="a.b.c", ref=""),
])
def test_awaiting_auth_closes_4401_on_a_malformed_first_frame(data: str) -> None:
    assert close_of(new_session(), data).code == CloseCode.BAD_CREDENTIAL


def test_awaiting_auth_close_reason_never_echoes_the_credential() -> None:
    closed = close_of(new_session(), frame("login", username="alice",
                                           password="hunter2-secret", device="d" * 65))
    assert "hunter2-secret" not in closed.reason


def test_a_binary_first_frame_closes_1003() -> None:
    closed = close_of(new_session(), b'{"type":"auth","token":"a.b.c"}')
    assert closed.code is CloseCode.UNSUPPORTED_DATA
    assert int(closed.code) == 1003


def test_a_binary_frame_when_ready_closes_1003() -> None:
    assert close_of(ready(), b'{"type":"ping"}').code == CloseCode.UNSUPPORTED_DATA


def test_authenticated_makes_the_session_ready_for_that_user() -> None:
    session = ready()
    assert session.user == "alice"
    assert session.receive(frame("ping", ref="p")).ref == "p"


def test_a_closed_session_accepts_nothing() -> None:
    session = ready()
    session.closed()
    assert session.phase is Phase.CLOSED
    close_of(session, frame("ping"))


# -- rate limit ------------------------------------------------------------------------------

RATE = LimitsConfig(rate=2.0, burst=4, max_rate_limited=5)


def test_the_burst_passes_then_frames_are_rate_limited() -> None:
    session = ready(RATE)
    for _ in range(4):
        session.receive(frame("ping"))
    error = error_of(session, frame("ping", ref="r1"))
    assert error.code is ErrorCode.RATE_LIMITED
    assert error.ref == "r1"


def test_the_bucket_refills_at_the_configured_rate() -> None:
    clock = Clock()
    session = ready(RATE, clock=clock)
    for _ in range(4):
        session.receive(frame("ping"))
    assert error_of(session, frame("ping")).code is ErrorCode.RATE_LIMITED
    clock.now += 0.5  # 2 per second: one token
    session.receive(frame("ping"))
    assert error_of(session, frame("ping")).code is ErrorCode.RATE_LIMITED
    clock.now += 1.0  # two tokens
    session.receive(frame("ping"))
    session.receive(frame("ping"))
    assert error_of(session, frame("ping")).code is ErrorCode.RATE_LIMITED


def test_the_bucket_never_saves_up_more_than_the_burst() -> None:
    clock = Clock()
    session = ready(RATE, clock=clock)
    clock.now += 3600.0
    for _ in range(4):
        session.receive(frame("ping"))
    assert error_of(session, frame("ping")).code is ErrorCode.RATE_LIMITED


def test_max_rate_limited_consecutive_rate_limited_frames_close_4029() -> None:
    session = ready(RATE)
    for _ in range(4):
        session.receive(frame("ping"))
    for _ in range(RATE.max_rate_limited - 1):
        assert error_of(session, frame("ping")).code is ErrorCode.RATE_LIMITED
    closed = close_of(session, frame("ping"))
    assert closed.code is CloseCode.RATE_ABUSED
    assert int(closed.code) == 4029


def test_a_frame_let_through_resets_the_rate_limited_count() -> None:
    clock = Clock()
    session = ready(RATE, clock=clock)
    for _ in range(4):
        session.receive(frame("ping"))
    for _ in range(RATE.max_rate_limited - 1):
        error_of(session, frame("ping"))
    clock.now += 0.5
    session.receive(frame("ping"))
    for _ in range(RATE.max_rate_limited - 1):
        assert error_of(session, frame("ping")).code is ErrorCode.RATE_LIMITED
    assert close_of(session, frame("ping")).code == CloseCode.RATE_ABUSED


def test_a_rate_limited_command_is_not_carried_out_even_when_valid() -> None:
    session = ready(RATE)
    for _ in range(4):
        session.receive(frame("ping"))
    error = error_of(session, frame("send", to="bob", text="hi", ref="s"))
    assert (error.code, error.ref) == (ErrorCode.RATE_LIMITED, "s")


def test_rate_limited_frames_are_not_bad_frames() -> None:
    limits = LimitsConfig(rate=1.0, burst=1, max_bad_frames=2, max_rate_limited=100)
    session = ready(limits)
    session.receive(frame("ping"))
    for _ in range(10):
        assert error_of(session, frame("ping")).code is ErrorCode.RATE_LIMITED


# -- bad frames ------------------------------------------------------------------------------

BAD_FRAMES = ["not json", "[1]", "{}", frame("nope"), frame("join"),
              frame("send", room="r"), frame("history", room="r", limit=0), '"x"']


@pytest.mark.parametrize("data", BAD_FRAMES)
def test_a_bad_frame_gets_bad_request_and_the_connection_stays(data: str) -> None:
    session = ready()
    assert error_of(session, data).code is ErrorCode.BAD_REQUEST
    assert session.receive(frame("ping")).type == "ping"


def test_max_bad_frames_in_a_row_close_4400() -> None:
    limits = dataclasses.replace(ROOMY, max_bad_frames=10)
    session = ready(limits)
    for i in range(9):
        assert error_of(session, BAD_FRAMES[i % len(BAD_FRAMES)]).code is ErrorCode.BAD_REQUEST
    closed = close_of(session, "not json")
    assert closed.code is CloseCode.PROTOCOL_VIOLATION
    assert int(closed.code) == 4400


def test_a_good_frame_resets_the_bad_frame_count() -> None:
    limits = dataclasses.replace(ROOMY, max_bad_frames=3)
    session = ready(limits)
    for _ in range(3):
        error_of(session, "{}")
        error_of(session, "nope")
        session.receive(frame("ping"))
    error_of(session, "{}")
    error_of(session, "{}")
    assert close_of(session, "{}").code == CloseCode.PROTOCOL_VIOLATION


def test_refused_but_well_formed_commands_do_not_count_as_bad_frames() -> None:
    limits = dataclasses.replace(ROOMY, max_bad_frames=2)
    session = ready(limits)
    for _ in range(5):
        assert error_of(session, frame("send", room="r", text="hi")).code is \
            ErrorCode.NOT_JOINED
        assert error_of(session, frame("admin", op="kick", user="bob")).code is \
            ErrorCode.FORBIDDEN


# -- errors carry the ref --------------------------------------------------------------------


@pytest.mark.parametrize("data,code", [
    (frame("send", room="r", ref="c1"), ErrorCode.BAD_REQUEST),  # no text
    (frame("teleport", ref="c1"), ErrorCode.BAD_REQUEST),
    (frame("history", room="r", limit=500, ref="c1"), ErrorCode.BAD_REQUEST),
    (frame("send", room="r", text="hi", ref="c1"), ErrorCode.NOT_JOINED),
    (frame("who", room="r", ref="c1"), ErrorCode.NOT_JOINED),
    (frame("admin", op="kick", user="bob", ref="c1"), ErrorCode.FORBIDDEN),
    (frame("login", username="a", password="b", ref="c1"), ErrorCode.BAD_REQUEST),
])
def test_errors_carry_the_commands_ref(data: str, code: ErrorCode) -> None:
    error = error_of(ready(), data)
    assert (error.code, error.ref) == (code, "c1")


def test_an_error_for_a_frame_with_a_malformed_ref_has_no_ref() -> None:
    error = error_of(ready(), frame("ping", ref="r" * 65))
    assert (error.code, error.ref) == (ErrorCode.BAD_REQUEST, None)


def test_an_error_for_invalid_json_has_no_ref() -> None:
    assert error_of(ready(), '{"type":"ping","ref":"c1"').ref is None


# -- rooms -----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    frame("send", room="general", text="hi"),
    frame("who", room="general"),
    frame("history", room="general"),
])
def test_room_commands_on_a_room_not_joined_are_not_joined(data: str) -> None:
    error = error_of(ready(), data)
    assert error.code is ErrorCode.NOT_JOINED
    assert "general" in error.message


def test_room_commands_pass_once_joined_and_not_after_leaving() -> None:
    session = ready()
    assert session.receive(frame("join", room="general")).type == "join"
    session.joined("general")
    for data in (frame("send", room="general", text="hi"), frame("who", room="general"),
                 frame("history", room="general")):
        session.receive(data)
    assert session.receive(frame("leave", room="general")).type == "leave"
    session.left("general")
    assert error_of(session, frame("send", room="general", text="hi")).code is \
        ErrorCode.NOT_JOINED


def test_joining_a_room_is_not_enough_for_another_room() -> None:
    session = ready()
    session.joined("general")
    assert error_of(session, frame("send", room="random", text="hi")).code is \
        ErrorCode.NOT_JOINED


def test_direct_messages_and_their_history_need_no_join() -> None:
    session = ready()
    assert session.receive(frame("send", to="bob", text="psst")).args == {"to": "bob",
                                                                         "text": "psst"}
    assert session.receive(frame("history", **{"with": "bob"})).args["with"] == "bob"


def test_leave_of_a_room_not_joined_is_let_through() -> None:
    assert ready().receive(frame("leave", room="general")).type == "leave"


def test_joining_more_rooms_than_allowed_is_too_many_rooms() -> None:
    session = ready(dataclasses.replace(ROOMY, max_rooms_per_connection=2))
    for room in ("a", "b"):
        session.receive(frame("join", room=room))
        session.joined(room)
    error = error_of(session, frame("join", room="c", ref="j3"))
    assert (error.code, error.ref) == (ErrorCode.TOO_MANY_ROOMS, "j3")
    assert "2" in error.message


def test_rejoining_a_room_already_joined_is_not_too_many_rooms() -> None:
    session = ready(dataclasses.replace(ROOMY, max_rooms_per_connection=2))
    for room in ("a", "b"):
        session.joined(room)
    assert session.receive(frame("join", room="a", since="5-0")).args["since"] == "5-0"


def test_leaving_a_room_makes_room_for_another() -> None:
    session = ready(dataclasses.replace(ROOMY, max_rooms_per_connection=1))
    session.joined("a")
    error_of(session, frame("join", room="b"))
    session.left("a")
    assert session.receive(frame("join", room="b")).type == "join"


# -- authentication while ready --------------------------------------------------------------


def test_login_when_ready_is_a_bad_request() -> None:
    error = error_of(ready(), frame("login", username="alice", password="pw"))
    assert error.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("data,kind", [(frame("auth", token="x.y.z"), "auth"),
                                       (frame("refresh", refresh_token="o"), "refresh")])
def test_auth_and_refresh_when_ready_are_renewals(data: str, kind: str) -> None:
    assert ready().receive(data).type == kind


def test_renewal_with_the_same_user_replaces_the_claims() -> None:
    session = ready()
    newer = Claims(sub="alice", jti="j9", iat=ALICE.iat + 600, exp=ALICE.exp + 600)
    session.renewed(newer)
    assert session.claims == newer
    assert session.user == "alice"


def test_renewal_with_another_user_is_forbidden_and_changes_nothing() -> None:
    session = ready()
    with pytest.raises(CommandError) as info:
        session.renewed(Claims(sub="mallory", jti="j9", iat=ALICE.iat, exp=ALICE.exp + 600))
    assert info.value.code is ErrorCode.FORBIDDEN
    assert session.claims == ALICE


def test_logout_when_ready_is_let_through() -> None:
    assert ready().receive(frame("logout", all=True)).args == {"all": True}


# -- admin -----------------------------------------------------------------------------------


def test_admin_without_the_admin_role_is_forbidden() -> None:
    error = error_of(ready(), frame("admin", op="kick", user="bob", ref="a1"))
    assert (error.code, error.ref) == (ErrorCode.FORBIDDEN, "a1")


def test_admin_with_another_role_is_forbidden() -> None:
    claims = dataclasses.replace(ALICE, role="moderator")
    assert error_of(ready(claims=claims), frame("admin", op="kick", user="bob")).code is \
        ErrorCode.FORBIDDEN


@pytest.mark.parametrize("data", [
    frame("admin", op="kick", user="bob"),
    frame("admin", op="revoke_tokens", user="bob"),
    frame("admin", op="revoke_jti", jti="abc", exp=1_800_000_000),
    frame("admin", op="disable_user", user="bob"),
    frame("admin", op="enable_user", user="bob"),
])
def test_admin_with_the_admin_role_is_let_through(data: str) -> None:
    assert ready(claims=ADMIN).receive(data).type == "admin"
